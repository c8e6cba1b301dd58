from coordtok_jax.train.trainer import run

if __name__ == "__main__":
    run()
