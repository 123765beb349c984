-- Write a new chain and its step-1 jobs (queued), only if the chain id is free.
-- KEYS[1] chain hash  KEYS[2] chain's job list  KEYS[3] stats hash  KEYS[4] batch hash
-- KEYS[5] batch member list  KEYS[6] poll schedule
-- ARGV[1] chain id  ARGV[2] batch id ('' for none)  ARGV[3] now
-- ARGV[4] when the poller checks a queued job  ARGV[5] steps JSON (worker/chains.py)
-- ARGV[6] idempotency key  ARGV[7] priority  ARGV[8] metadata JSON ('' for none)
-- ARGV[9] job hash prefix  ARGV[10] the whole chain's price (micro-dollars; budgets)
-- ARGV[11..] per step-1 job, 3 values: job id, branch, request JSON
-- Answer: {'new'} or {'exists', state}, then the ids of the step-1 jobs still queued
-- (a repeated chain re-sends those, as create_jobs.lua's callers do).
local chain, batch_id, now = KEYS[1], ARGV[2], ARGV[3]
local jobs = {}
for i = 11, #ARGV, 3 do table.insert(jobs, {ARGV[i], ARGV[i + 1], ARGV[i + 2]}) end
local state = redis.call('HGET', chain, 'state')
if state then
  local answer = {'exists', state}
  for _, j in ipairs(jobs) do
    if redis.call('HGET', ARGV[9] .. j[1], 'state') == 'queued' then
      table.insert(answer, j[1])
    end
  end
  return answer
end
redis.call('HSET', chain, 'id', ARGV[1], 'state', 'running', 'run', 1, 'steps', ARGV[5],
  'open', #jobs, 'batch_id', batch_id, 'created_at', now, 'idempotency_key', ARGV[6],
  'priority', ARGV[7], 'price_micros', ARGV[10])
if ARGV[8] ~= '' then redis.call('HSET', chain, 'metadata', ARGV[8]) end
local answer = {'new', 'running'}
for _, j in ipairs(jobs) do
  local key = ARGV[9] .. j[1]
  redis.call('HSET', key, 'id', j[1], 'state', 'queued', 'version', 1, 'request', j[3],
    'idempotency_key', '', 'priority', ARGV[7], 'batch_id', batch_id, 'attempts', 0,
    'created_at', now, 'updated_at', now, 'chain_id', ARGV[1], 'step', 1, 'branch', j[2])
  if ARGV[8] ~= '' then redis.call('HSET', key, 'metadata', ARGV[8]) end
  redis.call('ZADD', KEYS[6], 'NX', ARGV[4], j[1])
  redis.call('RPUSH', KEYS[2], j[1])
  if batch_id ~= '' then redis.call('RPUSH', KEYS[5], j[1]) end
  table.insert(answer, j[1])
end
redis.call('HINCRBY', KEYS[3], 'now:queued', #jobs)
redis.call('HINCRBY', KEYS[3], 'chain:started', 1)
if batch_id ~= '' then
  redis.call('HINCRBY', KEYS[4], 'total', #jobs)
  redis.call('HINCRBY', KEYS[4], 'now:queued', #jobs)
  redis.call('HSETNX', KEYS[4], 'created_at', now)
  redis.call('HINCRBY', KEYS[4], 'chains', 1)
end
return answer
