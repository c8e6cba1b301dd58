"""Flow-matching transport (SiT interpolants, losses) and SDE/ODE samplers over pytrees."""
