-- Take the jobs whose poll time has come and push each one's next poll into the
-- future (doubling back-off), in one step, so two sweeps never poll one job at once.
-- KEYS[1] poll schedule (zset)
-- ARGV[1] now  ARGV[2] limit  ARGV[3] min interval (s)  ARGV[4] max interval (s)
-- ARGV[5] job hash key prefix (the due ids are only known here)
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local min_i = tonumber(ARGV[3])
local max_i = tonumber(ARGV[4])
local claimed = {}
for _, job_id in ipairs(due) do
  local job = ARGV[5] .. job_id
  if redis.call('EXISTS', job) == 0 then
    -- The record expired or was never written: nothing left to poll.
    redis.call('ZREM', KEYS[1], job_id)
  else
    local n = redis.call('HINCRBY', job, 'poll_count', 1)
    local interval = math.min(max_i, min_i * math.pow(2, math.min(n - 1, 20)))
    redis.call('ZADD', KEYS[1], now + interval, job_id)
    table.insert(claimed, job_id)
  end
end
return claimed
