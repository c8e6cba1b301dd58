r"""Evaluate a CoordTok checkpoint (rFVD, PSNR, SSIM, LPIPS) with the paper's protocol.

    python -m coordtok_jax.evaluate --workdir=DIR [--config=configs/coordtok.py:ARG] [--step=N]
        [--num_videos=10000] [--i3d=i3d_pretrained_400.pt] [--mode=all|chunks] [--batch=B]

Writes DIR/eval_STEP.json and DIR/eval_STEP.md; see coordtok_jax/evaluate/run.py.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from coordtok_jax import entry

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Run (or torch-import) directory holding checkpoints/.")
    config_flags.DEFINE_config_file("config", None, "Data / LPIPS / mesh config (default: the checkpoint's).",
                                    lock_config=False)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("num_videos", 10_000, "Random clips to evaluate (the paper: 10,000).")
    flags.DEFINE_string("i3d", None, "I3D weights (i3d_pretrained_400.pt) for rFVD; skipped without.")
    flags.DEFINE_enum("mode", "all", ["all", "chunks", "official"],
                      "all: every patch in one joint pass (the paper's protocol, the default); chunks: contiguous "
                      "chunks of --points_per_call, remainder decoded; official: the official decode_video's "
                      "slicing exactly (equal chunks, remainder and a partial temporal patch left at zero).")
    flags.DEFINE_integer("points_per_call", None, "Chunk size for --mode=chunks and --mode=official (default: config.num_points).")
    flags.DEFINE_integer("batch", 0, "Clips per step over all devices (default: one per device).")
    flags.DEFINE_integer("seed", 0, "Seed of the clip draw.")
    flags.DEFINE_string("attention", None, "Override config.model.attention_impl (e.g. chunked on CPU, cudnn).")
    flags.DEFINE_string("output_dir", None, "Where to write eval_STEP.json/.md (default: --workdir).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (see --help)")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    from coordtok_jax.evaluate.run import evaluate, markdown

    results = evaluate(FLAGS.workdir, config=FLAGS.config, step=FLAGS.step, num_videos=FLAGS.num_videos,
                       batch=FLAGS.batch, mode=FLAGS.mode, points_per_call=FLAGS.points_per_call,
                       i3d_path=FLAGS.i3d, seed=FLAGS.seed, attention_impl=FLAGS.attention,
                       output_dir=FLAGS.output_dir)
    print(markdown(results))
    print(f"wrote {FLAGS.output_dir or FLAGS.workdir}/eval_{results['step']}.json")


def run():
    entry.run(__name__, define_flags, main, errors=(ValueError,))


if __name__ == "__main__":
    run()
