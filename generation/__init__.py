"""Generation from a trained model: windows and caches (engine.py), the samplers' shared helpers
(decoding.py), the speculative sampler (speculative.py), the sampler front door (sampling.py) and
steering (steering.py: goals, constraints, schedules, particle and rejection sampling)."""
