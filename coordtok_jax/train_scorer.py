"""Train the token-budget scorer of a nested-token tokenizer: `python -m coordtok_jax.train_scorer` (console script coordtok-train-scorer).

The tool lives in coordtok_jax/evaluate/token_scorer.py; its --help shows that module's documentation.
"""

from coordtok_jax.evaluate.token_scorer import run

if __name__ == "__main__":
    run()
