-- Write new queued jobs, each only if its id is free; answer per job 'new' or the
-- state the existing job is in (so a resumed batch can re-send the queued ones).
-- KEYS[1] stats hash  KEYS[2] batch hash  KEYS[3] batch member list  KEYS[4] poll schedule
-- KEYS[5..] the job hashes, one per job in ARGV order
-- ARGV[1] batch id ('' for none)  ARGV[2] now  ARGV[3] when the poller checks a queued job
-- ARGV[4..] per job, 5 values: job id, request JSON, idempotency key, priority,
--           metadata JSON ('' for none: then no field is written)
-- Only queued jobs (new, or found still queued) get a check on the poll schedule: a job
-- that already ended must not reappear there.
local answers = {}
local created = 0
local batch_id = ARGV[1]
for i = 4, #ARGV, 5 do
  local job_id = ARGV[i]
  local key = KEYS[5 + (i - 4) / 5]
  local state = redis.call('HGET', key, 'state')
  if state then
    if state == 'queued' then redis.call('ZADD', KEYS[4], 'NX', ARGV[3], job_id) end
    table.insert(answers, state)
  else
    redis.call('ZADD', KEYS[4], 'NX', ARGV[3], job_id)
    redis.call('HSET', key, 'id', job_id, 'state', 'queued', 'version', 1,
      'request', ARGV[i + 1], 'idempotency_key', ARGV[i + 2], 'priority', ARGV[i + 3],
      'batch_id', batch_id,
      'attempts', 0, 'created_at', ARGV[2], 'updated_at', ARGV[2])
    if ARGV[i + 4] ~= '' then redis.call('HSET', key, 'metadata', ARGV[i + 4]) end
    if batch_id ~= '' then redis.call('RPUSH', KEYS[3], job_id) end
    created = created + 1
    table.insert(answers, 'new')
  end
end
if created > 0 then
  redis.call('HINCRBY', KEYS[1], 'now:queued', created)
  if batch_id ~= '' then
    redis.call('HINCRBY', KEYS[2], 'total', created)
    redis.call('HINCRBY', KEYS[2], 'now:queued', created)
    redis.call('HSETNX', KEYS[2], 'created_at', ARGV[2])
  end
end
return answers
