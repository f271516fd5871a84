"""The run's configuration: the structured schema Hydra composes into (:mod:`.schema`: unknown keys and
bad types fail, the seed's aliases, cross-key checks) and the fingerprint a resume must match
(:mod:`.fingerprint`)."""
