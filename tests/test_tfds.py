"""The tfds source: a tiny builder with a Video feature, read through tfds.data_source."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")  # TFDS video features are encoded/decoded with TensorFlow
tfds = pytest.importorskip("tensorflow_datasets")

import coordtok  # noqa: E402

from coordtok_jax.data.pipeline import make_dataset  # noqa: E402
from coordtok_jax.data.sources import DataError, TfdsSource  # noqa: E402

pytestmark = pytest.mark.tf

LENGTHS = (20, 9, 16, 30, 12, 25)


def clip(i, length):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(length, 24, 40, 3), dtype=np.uint8)


class CoordtokTinyVideos(tfds.core.GeneratorBasedBuilder):
    """Six short random clips of different lengths, two classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Video(shape=(None, 24, 40, 3)),
                "label": tfds.features.ClassLabel(num_classes=2),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(range(6)), "test": self._generate_examples(range(2))}

    def _generate_examples(self, indices):
        for i in indices:
            yield i, {"video": clip(i, LENGTHS[i]), "label": i % 2}


def build(data_dir):
    builder = CoordtokTinyVideos(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build(data_dir)
    return data_dir


def test_tfds_source_reads_video_frames(tfds_dir):
    source = TfdsSource("coordtok_tiny_videos", "train", (8, 16, 16), data_dir=str(tfds_dir))
    assert len(source) == 6
    # records come back in file order, not index order: identify them by length
    seen = set()
    for i in range(6):
        item = source.load(i, np.random.default_rng(0))
        assert item["video"].shape == (8, 16, 16, 3) and item["video"].dtype == np.uint8
        seen.add((item["n_frames"], item["label"]))
    assert {n for n, _ in seen} == {8}  # every clip is at least 9 frames -> full windows
    example = source._source[0]
    length = np.asarray(example["video"]).shape[0]
    np.testing.assert_array_equal(np.asarray(example["video"]), clip(LENGTHS.index(length), length))


def test_tfds_pipeline_batches(tfds_dir):
    d = coordtok.get_config("tiny").data
    with d.unlocked():
        d.source, d.name, d.data_dir = "tfds", "coordtok_tiny_videos", str(tfds_dir)
    it = iter(make_dataset(d, (16, 16, 16), 3, process_index=0, process_count=1))
    for _ in range(3):
        b = next(it)
        assert b["video"].shape == (3, 16, 16, 16, 3)
        assert set(b["label"].tolist()) <= {0, 1}
        assert np.all((b["n_frames"] >= 9) & (b["n_frames"] <= 16))


def test_tfds_errors_name_the_dataset(tfds_dir):
    with pytest.raises(DataError, match="tfds: cannot open 'no_such_dataset'"):
        TfdsSource("no_such_dataset", "train", (8, 16, 16), data_dir=str(tfds_dir))
    source = TfdsSource("coordtok_tiny_videos", "train", (8, 16, 16), data_dir=str(tfds_dir), video_key="frames")
    with pytest.raises(DataError, match="no feature 'frames'"):
        source.load(0, np.random.default_rng(0))


@pytest.mark.gcs
def test_tfds_data_dir_on_gcs(tfds_dir):
    pytest.importorskip("gcp_storage_emulator")
    from etils import epath

    import gcs_emulator

    with gcs_emulator.running_emulator() as emu:
        bucket = emu.make_bucket()
        for path in tfds_dir.rglob("*"):
            if path.is_file():
                (epath.Path(f"gs://{bucket}/tfds") / path.relative_to(tfds_dir)).parent.mkdir(parents=True, exist_ok=True)
                (epath.Path(f"gs://{bucket}/tfds") / path.relative_to(tfds_dir)).write_bytes(path.read_bytes())
        remote = TfdsSource("coordtok_tiny_videos", "train", (8, 16, 16), data_dir=f"gs://{bucket}/tfds")
        local = TfdsSource("coordtok_tiny_videos", "train", (8, 16, 16), data_dir=str(tfds_dir))
        assert len(remote) == len(local) == 6
        for i in range(len(local)):
            a, b = remote.load(i, np.random.default_rng(i)), local.load(i, np.random.default_rng(i))
            np.testing.assert_array_equal(a["video"], b["video"])
            assert a["label"] == b["label"]
