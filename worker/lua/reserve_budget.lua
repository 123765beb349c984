-- Reserve one image's price against a batch budget, once per job; for a step of a chain,
-- the whole chain's price (every step of every branch), once per chain, at its first
-- submit: a budget then never starts a chain it cannot finish.
-- KEYS[1] job hash  KEYS[2] batch hash  KEYS[3] the job's chain hash (a missing key if none)
-- ARGV[1] price per image (in micro-dollars, an integer)
-- Answers 1 when the job may be submitted, 0 when the budget would be exceeded.
if redis.call('HGET', KEYS[1], 'reserved') == '1' then return 1 end
-- A finished job is never submitted (its claim is refused), and its record no longer
-- says whether it was reserved for (transition.lua): nothing to reserve.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' or state == 'failed' or state == 'cancelled' then return 1 end
local budget = tonumber(redis.call('HGET', KEYS[2], 'budget_micros') or '-1')
local price = tonumber(ARGV[1])
local chain_price = tonumber(redis.call('HGET', KEYS[3], 'price_micros') or '')
if chain_price then
  if redis.call('HGET', KEYS[3], 'reserved') == '1' then
    redis.call('HSET', KEYS[1], 'reserved', '1')
    return 1
  end
  price = chain_price
end
if budget >= 0 then
  local reserved = tonumber(redis.call('HGET', KEYS[2], 'reserved_micros') or '0')
  if reserved + price > budget then return 0 end
end
redis.call('HINCRBY', KEYS[2], 'reserved_micros', price)
redis.call('HSET', KEYS[1], 'reserved', '1')
if chain_price then redis.call('HSET', KEYS[3], 'reserved', '1') end
return 1
