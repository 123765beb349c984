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
local now = ARGV[2]
local members = {}
local poll = {}
-- Counters rather than table.insert, `#` and an index computed per job: this loop runs
-- 100,000 times for a `kq batch` of as many lines, and Redis does nothing else meanwhile.
local n = 0
for i = 4, #ARGV, 5 do
  n = n + 1
  local job_id = ARGV[i]
  local key = KEYS[4 + n]
  local state = redis.call('HGET', key, 'state')
  if state then
    if state == 'queued' then redis.call('ZADD', KEYS[4], 'NX', ARGV[3], job_id) end
    answers[n] = state
  else
    poll[2 * created + 1] = ARGV[3]
    poll[2 * created + 2] = job_id
    local idem, priority, metadata = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if batch_id ~= '' then members[#members + 1] = job_id end
    if batch_id ~= '' and idem ~= '' and priority == '0' and metadata == '' then
      -- A batch file's usual line, written without building a table to unpack.
      redis.call('HSET', key, 'state', 'queued', 'version', 1, 'request', ARGV[i + 1],
        'attempts', 0, 'created_at', now, 'updated_at', now, 'batch_id', batch_id,
        'idempotency_key', idem)
    else
      local fields = {'state', 'queued', 'version', 1, 'request', ARGV[i + 1], 'attempts', 0,
        'created_at', now, 'updated_at', now}
      if batch_id ~= '' then
        fields[#fields + 1] = 'batch_id'; fields[#fields + 1] = batch_id
      end
      if idem ~= '' then
        fields[#fields + 1] = 'idempotency_key'; fields[#fields + 1] = idem
      end
      if priority ~= '0' then
        fields[#fields + 1] = 'priority'; fields[#fields + 1] = priority
      end
      if metadata ~= '' then
        fields[#fields + 1] = 'metadata'; fields[#fields + 1] = metadata
      end
      redis.call('HSET', key, unpack(fields))
    end
    created = created + 1
    answers[n] = 'new'
  end
end
-- In bulk: one command per 1,000 jobs for the poll checks and the batch members (a job
-- is created at most once per call, so no member is pushed twice).
for j = 1, #poll, 2000 do
  redis.call('ZADD', KEYS[4], 'NX', unpack(poll, j, math.min(j + 1999, #poll)))
end
for j = 1, #members, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(members, j, math.min(j + 999, #members)))
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
