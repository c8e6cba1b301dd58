"""Self-contained PyTorch transcriptions of the official CoordTok (coordtok) and triplane SiT (sit)
with the official state_dict keys: the references of the parity tests and of `convert`. They need
torch (`pip install -e ".[torch]"`)."""
