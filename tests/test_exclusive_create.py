"""Create-if-absent records on file:// and S3 (moto): of writers racing for one name exactly one wins, so two
drivers claiming one storage root make exactly one owner."""

from __future__ import annotations

import threading
import time

import pytest

from s3_support import s3_bucket, s3_endpoint  # noqa: F401 (fixtures)

from sims_platform.k8s.ownership import OwnershipError, claim, owner_uri
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "file":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_create_refuses_an_existing_name(root):
    uri = fsio.join(root, "record.json")
    fsio.create_json(uri, {"writer": 1})
    with pytest.raises(FileExistsError):
        fsio.create_json(uri, {"writer": 2})
    assert fsio.read_json(uri) == {"writer": 1}
    assert fsio.listdir(root) == ["record.json"]  # no temporary file left behind


def test_two_concurrent_claims_make_exactly_one_owner(root, monkeypatch):
    layout = RunLayout.of(root)
    real_exists = fsio.exists

    def slow_exists(uri: str) -> bool:
        # Widen the window between looking and writing: a claim that checks, then writes, loses it every time.
        found = real_exists(uri)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(fsio, "exists", slow_exists)
    start, results = threading.Barrier(2), {}

    def contend(release: str) -> None:
        start.wait()
        try:
            results[release] = claim(layout, "ns", release, "run")
        except OwnershipError as err:
            results[release] = err

    threads = [threading.Thread(target=contend, args=(r,)) for r in ("blue", "green")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    owners = [r for r, v in results.items() if isinstance(v, dict)]
    assert len(owners) == 1, results
    owner = owners[0]
    loser = next(r for r in results if r != owner)
    assert isinstance(results[loser], OwnershipError)
    assert f"belongs to release '{owner}'" in str(results[loser]) and f"this is release '{loser}'" in str(results[loser])
    assert fsio.read_json(owner_uri(layout)) == {"namespace": "ns", "release": owner, "run": "run"}
    assert claim(layout, "ns", owner, "run")["release"] == owner  # the owner's restart keeps it
