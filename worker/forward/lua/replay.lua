-- Move parked deliveries back to the queue, due now, with their attempts reset (a new
-- retry window starts). Ids not in the dead list are skipped.
-- KEYS: dead zset, due zset, age zset, meta hash, body hash
-- ARGV: now, event id...
-- Returns how many were moved.
local moved = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    if redis.call('HEXISTS', KEYS[5], id) == 1 then
      redis.call('ZADD', KEYS[2], ARGV[1], id)
      redis.call('ZADD', KEYS[3], ARGV[1], id)
      redis.call('HDEL', KEYS[4], id)
      moved = moved + 1
    end
  end
end
return moved
