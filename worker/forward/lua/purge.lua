-- Forget parked deliveries for good. Ids not in the dead list are skipped.
-- KEYS: dead zset, meta hash, body hash
-- ARGV: event id...
-- Returns how many were dropped.
local dropped = 0
for i = 1, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    dropped = dropped + 1
  end
end
return dropped
