-- Take the completed jobs whose outputs are due for a copy, and lease each one by pushing
-- its score to now + lease, in one step, so two copiers never copy one job at once. A
-- copier that dies mid-copy loses nothing: the lease runs out and another takes the job.
-- KEYS[1] outputs due (zset)
-- ARGV[1] now  ARGV[2] limit  ARGV[3] lease (s)  ARGV[4] job hash key prefix
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, job_id in ipairs(due) do
  local job = ARGV[4] .. job_id
  local done = redis.call('HGET', job, 'outputs_state')
  if redis.call('EXISTS', job) == 0 or done == 'stored' or done == 'failed' then
    -- The record expired, or its outputs were settled by another copier: nothing to do.
    redis.call('ZREM', KEYS[1], job_id)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), job_id)
    redis.call('HSETNX', job, 'outputs_since', ARGV[1])
    table.insert(claimed, job_id)
  end
end
return claimed
