-- Take the jobs whose poll time has come and push each one's next poll into the
-- future (doubling back-off), in one step, so two sweeps never poll one job at once.
-- KEYS[1] poll schedule (zset)
-- ARGV[1] now  ARGV[2] limit  ARGV[3] min interval (s)  ARGV[4] max interval (s)
-- ARGV[5] job hash key prefix (the due ids are only known here)
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then
  return due
end
-- The due jobs are the schedule's first #due entries: removing them from its head is one
-- cheap step, where moving each one in place would search the whole schedule twice.
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, #due - 1)
local min_i = tonumber(ARGV[3])
local max_i = tonumber(ARGV[4])
local claimed = {}
local next_polls = {}
for _, job_id in ipairs(due) do
  local job = ARGV[5] .. job_id
  -- A job whose record expired (or was never written) has nothing left to poll: it is
  -- not put back.
  if redis.call('EXISTS', job) == 1 then
    local n = redis.call('HINCRBY', job, 'poll_count', 1)
    local interval = math.min(max_i, min_i * math.pow(2, math.min(n - 1, 20)))
    next_polls[#next_polls + 1] = now + interval
    next_polls[#next_polls + 1] = job_id
    claimed[#claimed + 1] = job_id
  end
end
-- Back in one ZADD, a few hundred at a time (Lua's unpack has a stack limit).
local step = 400
for i = 1, #next_polls, step do
  redis.call('ZADD', KEYS[1], unpack(next_polls, i, math.min(i + step - 1, #next_polls)))
end
return claimed
