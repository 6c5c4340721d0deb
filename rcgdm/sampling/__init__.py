"""The sampling core: the paper's term and everything that feeds it, shared by rcgdm's drivers (RewardDirectedPipeline
and inference.py through the loop, rcgdm.steer's hook inside stock pipelines, the simulation).

- families.py: the model families (SD, SDXL, SD3, FLUX), what their denoisers predict and how their latents are shaped.
- schedulers.py: the samplers the term is exact for and the noise level each sits at, step by step.
- latent_scaling.py: the VAE's latents as the denoiser sees them.
- guidance.py: the term itself, for every prediction type (RewardGuidance).
- posterior.py: the posterior strength 1 / Var(y | x_t), read off the predictor's errors.
- sampler.py: the guided loop over a pipeline's components.
- particles.py: twisted SMC with the term as its proposal.
"""
