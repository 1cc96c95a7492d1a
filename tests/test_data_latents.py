"""The VAE latent cache, with a tiny AutoencoderKL built from a config."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from dsvlm.data.dataset import PreparedSplit
from dsvlm.data.geometry import SquareGeometry
from dsvlm.data.latents import IMAGES, IMAGES_SCHEMA, SHARD_SIZE, LatentCache, build_latent_cache, write_index
from dsvlm.data.prepared import PreparedDataset
from dsvlm.data.synthetic import SyntheticConfig, prepare_synthetic
from dsvlm.errors import DataError
from dsvlm.model.supervision.vae import encode, vae_fingerprint, vae_input

PAD = SquareGeometry("pad", (122, 116, 104))


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    out = tmp_path_factory.mktemp("latents") / "data"
    prepare_synthetic(out, SyntheticConfig(n_align=6, n_instruct=10, n_eval=2), progress=False)
    vae = tiny_vae()
    fingerprint = vae_fingerprint(vae)
    build_latent_cache(out, vae, 32, fingerprint, PAD, batch_size=4, progress=False)
    return out, vae, fingerprint


def test_fingerprint_tracks_config_and_weights() -> None:
    a, b = tiny_vae(0), tiny_vae(0)
    assert vae_fingerprint(a) == vae_fingerprint(b)
    assert vae_fingerprint(a) != vae_fingerprint(tiny_vae(1))
    with torch.no_grad():
        b.encoder.conv_in.bias[0] += 1e-3
    assert vae_fingerprint(a) != vae_fingerprint(b)
    c = tiny_vae(0)
    c.register_to_config(scaling_factor=0.25)
    assert vae_fingerprint(a) != vae_fingerprint(c)


def test_round_trip(cached: tuple[Path, object, str]) -> None:
    out, vae, fingerprint = cached
    dataset = PreparedDataset(out)
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    with_images = [r for split in dataset.splits for r in dataset.records(split) if r["image"] is not None]
    assert len(cache) == len(with_images)
    assert cache.shape == (4, 16, 16)
    for record in with_images[:5] + with_images[-3:]:
        pixels = vae_input(PAD(dataset.load_image(record)), 32)
        assert pixels.shape == (3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0
        expected = encode(vae, pixels[None])[0]
        assert torch.allclose(cache.get_image(record["image"]), expected, atol=1e-5)
    # deterministic: the posterior mean, not a sample
    record = with_images[0]
    twice = [encode(vae, vae_input(PAD(dataset.load_image(record)), 32)[None]) for _ in range(2)]
    assert torch.equal(*twice)
    info = dataset.manifest["latents"]
    assert info == {
        "dir": "latents",
        "fingerprint": fingerprint,
        "resolution": 32,
        "geometry": PAD.key,
        "shape": [4, 16, 16],
        "images": len(with_images),
    }
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_prepared_split_serves_latents(cached: tuple[Path, object, str]) -> None:
    out, _, fingerprint = cached
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    split = PreparedSplit(out, "align", latents=cache)
    item = split[2]
    assert torch.equal(item["latent"], cache.get_image(PreparedDataset(out).records("align")[2]["image"]))
    clone = pickle.loads(pickle.dumps(split))  # DataLoader workers: safetensors handles are reopened
    assert torch.equal(clone[2]["latent"], item["latent"])
    instruct = PreparedSplit(out, "instruct", latents=cache)
    assert all((it["latent"] is None) == (it["image"] is None) for it in instruct)


def test_mismatched_cache_is_refused(cached: tuple[Path, object, str]) -> None:
    out, _, fingerprint = cached
    other = vae_fingerprint(tiny_vae(1))
    with pytest.raises(DataError, match=r"built for another VAE.*dsvlm prepare latents"):
        LatentCache.open(out, other, 32, PAD)
    with pytest.raises(DataError, match=r"built at resolution 32, the recipe uses 64.*dsvlm prepare latents"):
        LatentCache.open(out, fingerprint, 64, PAD)
    with pytest.raises(DataError, match=r"image geometry pad\[122, 116, 104\], the recipe uses crop"):
        LatentCache.open(out, fingerprint, 32, SquareGeometry("crop"))


def test_missing_and_stale_cache(cached: tuple[Path, object, str], tmp_path: Path) -> None:
    out, _, fingerprint = cached
    with pytest.raises(DataError, match=r"no latent cache.*dsvlm prepare latents"):
        LatentCache.open(tmp_path, fingerprint, 32, PAD)
    first = PreparedDataset(out).records("align")[0]["image"]
    edited = _edited_copy(out, tmp_path, lambda _, d: _edit_images(d, lambda rows: rows.remove(_row_of(rows, first))))
    cache = LatentCache.open(edited, fingerprint, 32, PAD)
    with pytest.raises(DataError, match="not in the latent cache"):
        PreparedSplit(edited, "align", latents=cache)
    with pytest.raises(DataError, match="no latent for image"):
        cache.get_image(first)
    with pytest.raises(DataError, match=r"latent cache version 2 is not 3.*dsvlm prepare latents"):
        LatentCache.open(
            _edited_copy(out, tmp_path / "old", lambda index, _: index.update(version=2)), fingerprint, 32, PAD
        )


def _edited_copy(cached_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the cached dataset whose latents/index.json went through `edit(index, latents_dir)`."""
    import shutil

    out = tmp_path / "data"
    shutil.copytree(cached_dir, out, symlinks=True)
    index_path = out / "latents" / "index.json"
    index = json.loads(index_path.read_text())
    edit(index, out / "latents")
    index_path.write_text(json.dumps(index))
    return out


def _edit_images(directory: Path, edit) -> None:
    """Rewrite the cache's images.arrow after `edit(rows)` changed its rows ({image, shard, row} dicts)."""
    rows = pa.ipc.open_file(str(directory / IMAGES)).read_all().to_pylist()
    edit(rows)
    table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
    with pa.OSFile(str(directory / IMAGES), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _row_of(rows: list[dict], image: str) -> dict:
    return next(row for row in rows if row["image"] == image)


def _drop_row_column(directory: Path) -> None:
    table = pa.ipc.open_file(str(directory / IMAGES)).read_all().drop_columns(["row"])
    with pa.OSFile(str(directory / IMAGES), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _cut_shard(index: dict, directory: Path) -> None:
    shard = directory / index["shards"][0]
    shard.write_bytes(shard.read_bytes()[:-64])


def _escape(index: dict, directory: Path) -> None:
    (directory.parent.parent / "elsewhere.safetensors").write_bytes((directory / index["shards"][0]).read_bytes())
    index["shards"][0] = "../../elsewhere.safetensors"


def _link_out(index: dict, directory: Path) -> None:
    (directory.parent.parent / "elsewhere.safetensors").write_bytes((directory / index["shards"][0]).read_bytes())
    (directory / "link.safetensors").symlink_to(directory.parent.parent / "elsewhere.safetensors")
    index["shards"][0] = "link.safetensors"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda index, _: index.update(shape=[4, 3, 3]), r"shape \[4, \d+, \d+\], but the index says \[4, 3, 3\]"),
        (lambda _, d: _edit_images(d, lambda rows: rows[0].update(row=999)), r"shard 0, row 999"),
        (lambda _, d: _edit_images(d, lambda rows: rows[-1].update(shard=3, row=0)), r"shard 3, row 0"),
        (lambda _, d: _edit_images(d, list.reverse), r"images.arrow: image column not sorted or not unique"),
        (lambda _, d: _drop_row_column(d), r"images.arrow: columns \(image: string\nshard: uint32\), expected"),
        (lambda _, d: (d / IMAGES).unlink(), r"images.arrow: latent lookup table cannot be read"),
        (
            lambda index, _: index.update(shards="shard-00000.safetensors"),
            r"index.json: not a valid LatentIndex \(shards",
        ),
        (lambda index, _: index.update(resolution="32"), r"not a valid LatentIndex \(resolution"),
        (lambda index, _: index.pop("shards"), r"not a valid LatentIndex \(shards: Field required"),
        (_cut_shard, r"shard-00000.safetensors: latent shard cannot be read"),
        (_escape, r"must be a path relative to the dataset, without '..'"),
        (_link_out, r"shards 'link.safetensors' resolves to .*elsewhere.safetensors, outside"),
    ],
)
def test_the_index_is_checked_against_the_shards(cached, tmp_path: Path, edit, message: str) -> None:
    cached_dir, _, fingerprint = cached
    out = _edited_copy(cached_dir, tmp_path, edit)
    with pytest.raises(DataError, match=message):
        LatentCache.open(out, fingerprint, 32, PAD)


def test_a_shard_cut_short_after_opening_is_a_clean_error(cached, tmp_path: Path) -> None:
    cached_dir, _, fingerprint = cached
    out = _edited_copy(cached_dir, tmp_path, lambda index, _: None)
    cache = LatentCache.open(out, fingerprint, 32, PAD)
    _cut_shard(cache.index, out / "latents")
    with pytest.raises(DataError, match=r"shard-00000\.safetensors: latent shard cannot be read"):
        cache.get_image(cache.images.column("image")[0].as_py())


def test_rebuild_replaces_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_synthetic(out, SyntheticConfig(n_align=3, n_instruct=3, n_eval=1), progress=False)
    vae = tiny_vae()
    fingerprint = vae_fingerprint(vae)
    build_latent_cache(out, vae, 32, fingerprint, PAD, progress=False)
    manifest = build_latent_cache(out, vae, 16, fingerprint, PAD, progress=False)
    assert manifest["latents"]["resolution"] == 16
    assert json.loads((out / "latents" / "index.json").read_text())["resolution"] == 16
    image = PreparedDataset(out).records("align")[0]["image"]
    assert LatentCache.open(out, fingerprint, 16, PAD).get_image(image).shape == (4, 8, 8)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "latents"))) == ["latents"]


def _containers(value: object, seen: set[int]) -> list[int]:
    """The sizes of every dict, list, tuple and set reachable from `value` (attributes of objects included)."""
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set):
        items = list(value)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        return _containers(vars(value), seen)
    else:
        return []
    return [len(items), *(size for item in items for size in _containers(item, seen))]


def test_a_large_cache_holds_no_per_image_python_objects(tmp_path: Path) -> None:
    """The lookup is a binary search over the memory-mapped table: the opened cache (and its pickle, what every
    DataLoader worker gets) holds nothing per image."""
    n = 2 * SHARD_SIZE + 500  # three shards
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()  # written unsorted
    paths = [f"set{i % 7}/{i:06d}-é.jpg" for i in order]
    directory = tmp_path / "data" / "latents"
    directory.mkdir(parents=True)
    shards = []
    for start in range(0, n, SHARD_SIZE):  # latent of path i = its position, so each lookup is checked
        shards.append(f"shard-{len(shards):05d}.safetensors")
        position = torch.arange(start, min(n, start + SHARD_SIZE), dtype=torch.float32)
        save_file({"latents": position.reshape(-1, 1, 1, 1)}, str(directory / shards[-1]))
    metadata = {"version": 3, "fingerprint": "f" * 64, "resolution": 8, "geometry": PAD.key, "shape": [1, 1, 1]}
    write_index(directory, {**metadata, "scaling_factor": 1.0, "shards": shards}, paths)
    cache = LatentCache.open(directory.parent, "f" * 64, 8, PAD)
    assert len(cache) == n and paths[0] in cache and "set0/missing.jpg" not in cache
    for position in [0, 1, SHARD_SIZE - 1, SHARD_SIZE, n - 1, *range(17, n, 997)]:
        assert cache.get_image(paths[position]).item() == position
    with pytest.raises(DataError, match=r"no latent for image 'set0/missing\.jpg'"):
        cache.get_image("set0/missing.jpg")
    assert max(_containers(cache, set())) < 50  # attributes, index.json's keys and shard names: none per image
    pickled = pickle.dumps(cache)
    assert len(pickled) < 2000  # the directory and metadata; the tables are mapped again
    clone = pickle.loads(pickled)
    assert clone.get_image(paths[n - 1]).item() == n - 1 and len(clone) == n
    assert max(_containers(clone, set())) < 50


def test_cache_and_training_branch_share_the_shift_and_scale() -> None:
    """SD3/FLUX-style VAEs have a shift factor: the cache must apply it exactly as training does."""
    from dsvlm.model.supervision import branch

    vae = tiny_vae()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = encode(vae, pixels)
    vae.register_to_config(shift_factor=0.1)
    shifted = encode(vae, pixels)
    assert torch.allclose(plain - shifted, torch.full_like(plain, 0.1 * vae.config.scaling_factor), atol=1e-6)
    assert branch.encode_latents is encode  # the branch encodes with this same function
