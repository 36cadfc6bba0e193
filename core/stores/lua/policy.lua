-- put_policy: store a policy document as the next version, with its audit record.
-- KEYS are the global ("{~}") keys: KEYS[1] the policy hash {version, document}, KEYS[4] the global log.
-- ARGV[3] the document (JSON). Reply: the new version.

local version = redis.call('HINCRBY', K_LEDGER, 'version', 1)
redis.call('HSET', K_LEDGER, 'document', ARGV[3])
audit('policy_set', '', '', '', 'version=' .. fmt_int(version))
return version
