"""The student's sampler: batched rollouts with a shared prompt KV, and branching from them.

    from gradalign_jax import sampling
    cfg_s = sampling.SamplingConfig(max_new_tokens=256, temperature=1.0, eos_ids=(eos_id,))
    ro = sampling.sample(cfg, params, prompts, cfg_s, num_samples=G, seed=0)
    br = sampling.branch(cfg, params, ro, rows, depths, tokens, num_samples=M, seed=1)

See ``sampler.py`` for the contract (policy, keys, shapes) and ``models/cache.py`` for the KV
state (``RolloutState`` is re-exported here).
"""

from gradalign_jax.models.cache import RolloutState
from gradalign_jax.sampling.sampler import (STOP_EOS, STOP_MAX_TOKENS, STOP_REASONS, Rollouts,
                                            SamplingConfig, as_policy, branch,
                                            in_support, policy_logits,
                                            policy_logprobs, sample)

__all__ = ["RolloutState", "Rollouts", "STOP_EOS", "STOP_MAX_TOKENS", "STOP_REASONS",
           "SamplingConfig", "as_policy", "branch", "in_support", "policy_logits",
           "policy_logprobs", "sample"]
