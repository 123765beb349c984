-- Write new queued jobs, each only if its id is free; answer per job 'new' or the
-- state the existing job is in (so a resumed batch can re-send the queued ones).
-- KEYS[1] stats hash  KEYS[2] batch hash  KEYS[3] batch member list  KEYS[4] poll schedule
-- KEYS[5..] the job hashes, one per job in ARGV order
-- ARGV[1] batch id ('' for none)  ARGV[2] now  ARGV[3] when the poller checks a queued job
-- ARGV[4..] per job, 5 values: job id, request JSON, idempotency key, priority,
--           metadata JSON ('' for none)
-- Only queued jobs (new, or found still queued) get a check on the poll schedule: a job
-- that already ended must not reappear there.
-- The record holds no field at its default (decode_job reads them back): no `id` (it is
-- in the key), no empty idempotency key, metadata or batch id, no priority 0. Every field
-- costs bytes for the whole week a finished record lives (see bench/memory.py).
local answers = {}
local created = 0
local batch_id = ARGV[1]
local members = {}
local poll = {}
for i = 4, #ARGV, 5 do
  local job_id = ARGV[i]
  local key = KEYS[5 + (i - 4) / 5]
  local state = redis.call('HGET', key, 'state')
  if state then
    if state == 'queued' then redis.call('ZADD', KEYS[4], 'NX', ARGV[3], job_id) end
    table.insert(answers, state)
  else
    poll[#poll + 1] = ARGV[3]
    poll[#poll + 1] = job_id
    local fields = {'state', 'queued', 'version', 1, 'request', ARGV[i + 1], 'attempts', 0,
      'created_at', ARGV[2], 'updated_at', ARGV[2]}
    if batch_id ~= '' then
      fields[#fields + 1] = 'batch_id'; fields[#fields + 1] = batch_id
      members[#members + 1] = job_id
    end
    if ARGV[i + 2] ~= '' then
      fields[#fields + 1] = 'idempotency_key'; fields[#fields + 1] = ARGV[i + 2]
    end
    if ARGV[i + 3] ~= '0' then
      fields[#fields + 1] = 'priority'; fields[#fields + 1] = ARGV[i + 3]
    end
    if ARGV[i + 4] ~= '' then
      fields[#fields + 1] = 'metadata'; fields[#fields + 1] = ARGV[i + 4]
    end
    redis.call('HSET', key, unpack(fields))
    created = created + 1
    table.insert(answers, 'new')
  end
end
-- In bulk: one command per 1,000 jobs for the poll checks and the batch members (a job
-- is created at most once per call, so no member is pushed twice).
for n = 1, #poll, 2000 do
  redis.call('ZADD', KEYS[4], 'NX', unpack(poll, n, math.min(n + 1999, #poll)))
end
for n = 1, #members, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(members, n, math.min(n + 999, #members)))
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
