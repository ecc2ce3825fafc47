"""msr-train's Hydra plugins, installed as the ``hydra_plugins.msr_train`` package."""
