"""The checkpoint store (flows/training/checkpoints.py) without training: versions named by
step, committed last; an uncommitted one (a kill mid-write) is never read and is pruned; a
truncated one (a whole file cut short, or one shard of a sharded version) is set aside and the
one before is read. tests/scaleout/test_checkpoints_s3.py runs the same on the test S3."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from flows.training.checkpoints import STATE, Slot, Store, Version, checkpoint_store
from stages.common.inputs import Placeholder


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_version(slot: Slot, step: int, sharded: bool, commit: bool = True) -> str:
    """A version of ``slot`` as flows/training/run.py writes one (tensors + state)."""
    name = slot.version_name(step, sharded)
    state = {"loader": {}, "counters": {"step": step}, "code": {"fingerprint": "f"}}
    tensors = {"model": {"w": torch.full((4096,), float(step))}}
    if sharded:
        dcp.save(tensors, storage_writer=FsspecWriter(f"{slot.store.url}/{name}"), no_dist=True)
        if commit:
            slot.store.write(f"{name}/{STATE}", _bytes(state))
    elif commit:
        slot.store.write(name, _bytes({**tensors, **state}))
    else:
        slot.store.fs.pipe_file(f"{slot.store.root}/{name}.tmp", b"half a checkpoint")
    return name


def check_versions(store: Store, sharded: bool) -> None:
    slot = Slot(store, "latest")
    for step in (4, 6):
        write_version(slot, step, sharded)
    uncommitted = write_version(slot, 8, sharded, commit=False)
    other = Slot(store, "trunk-latest")
    write_version(other, 9, sharded)
    assert [v.step for v in slot.versions()] == [6, 4]  # step 8 never committed
    assert store.slot_names() == {"latest", "trunk-latest"}
    newest = slot.versions()[0]
    assert newest.meta() == ("f", 6)

    cut = f"{newest.name}/__0_0.distcp" if sharded else newest.name
    data = store.read(cut)
    store.fs.pipe_file(f"{store.root}/{cut}", data[: len(data) // 2])  # a copy fault
    with pytest.raises(Exception):  # noqa: B017, PT011 (zip, mmap, EOF or size: any)
        newest.check()
    before = slot.resumable()
    assert before is not None and before.step == 4
    assert f"{newest.name}.corrupt" in store.entries()  # set aside, kept
    assert [v.step for v in slot.versions()] == [4]

    slot.prune(keep=1)  # what a save does after its commit
    names = set(store.entries())
    assert before.name in names and uncommitted not in names and f"{uncommitted}.tmp" not in names
    assert [v.step for v in other.versions()] == [9]  # another slot: untouched
    slot.clear()
    assert slot.versions() == [] and not slot.exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_versions_commits_and_a_truncated_version_set_aside(tmp_path, sharded):
    check_versions(Store(tmp_path / "store"), sharded)


def test_a_study_files_placeholder_store_is_refused_naming_the_key(tmp_path):
    with pytest.raises(Placeholder, match="train.checkpoint_store"):
        checkpoint_store("<s3://your-bucket/checkpoints>", tmp_path)
    assert checkpoint_store(None, tmp_path).url == str(tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        PermissionError("Access Denied"),
        ConnectionResetError(104, "Connection reset by peer"),
        RuntimeError("DefaultCPUAllocator: not enough memory"),
    ],
    ids=["denied", "reset", "memory"],
)
def test_a_store_that_cannot_be_read_condemns_no_version(tmp_path, monkeypatch, error):
    """The store's own trouble (credentials, permissions, the network: what s3fs raises as
    OSError) or the machine's (memory), unlike a version that reads short, propagates from the
    resume and sets nothing aside; once the store answers again, the newest version is read."""
    store = Store(tmp_path / "store")
    slot = Slot(store, "latest")
    for step in (4, 6):
        write_version(slot, step, sharded=False)
    state = Version.state

    def unreachable(self):
        raise error

    monkeypatch.setattr(Version, "state", unreachable)
    with pytest.raises(type(error)):
        slot.resumable()
    monkeypatch.setattr(Version, "state", state)
    assert not [n for n in store.entries() if n.endswith(".corrupt")]
    assert slot.resumable().step == 6
