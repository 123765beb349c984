-- Reserve one image's price against a batch budget, once per job.
-- KEYS[1] job hash  KEYS[2] batch hash
-- ARGV[1] price per image (in micro-dollars, an integer)
-- Answers 1 when the job may be submitted, 0 when the budget would be exceeded.
if redis.call('HGET', KEYS[1], 'reserved') == '1' then return 1 end
local budget = tonumber(redis.call('HGET', KEYS[2], 'budget_micros') or '-1')
local price = tonumber(ARGV[1])
if budget >= 0 then
  local reserved = tonumber(redis.call('HGET', KEYS[2], 'reserved_micros') or '0')
  if reserved + price > budget then return 0 end
end
redis.call('HINCRBY', KEYS[2], 'reserved_micros', price)
redis.call('HSET', KEYS[1], 'reserved', '1')
return 1
