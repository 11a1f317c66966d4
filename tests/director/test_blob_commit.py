"""Which failed commits may delete the blob a director wrote first.

A director writes an object's data as a blob, then sends the owner the record that refers
to it.  If the owner answers with an S3 error the record was certainly not applied and
the blob can go at once.  After a timeout (or no owner in time) the record may have been
applied, or may still be: deleting the blob then would leave an object whose data is
gone, so it must stay for the orphan sweeper.  Real store, stand-in router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cohort.director.router import Unavailable
from cohort.director.s3app import S3App
from cohort.rpc import RpcError, RpcTimeout
from cohort.s3.errors import S3Error
from cohort.storage.local import LocalStore


class OneAnswerRouter:
    """Answers every call by raising ``exc`` (after recording the call)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls: list[tuple[int, str, Any]] = []

    async def call(self, p: int, method: str, params: Any) -> Any:
        self.calls.append((p, method, params))
        raise self.exc


async def _commit(tmp_path: Path, exc: BaseException) -> tuple[LocalStore, BaseException]:
    store = LocalStore(str(tmp_path))
    await store.put("blobs/0001/ab/x-ab", b"data")
    app = S3App(OneAnswerRouter(exc), store, lambda _k: None)  # type: ignore[arg-type]
    with pytest.raises(BaseException) as e:
        await app._commit_blob(1, "obj.put", {"b": "b", "k": "k", "rid": "x"}, "blobs/0001/ab/x-ab")
    return store, e.value


async def _exists(store: LocalStore, key: str) -> bool:
    return key in [k async for k in store.list("blobs/")]


async def test_an_answered_s3_error_deletes_the_blob(tmp_path: Path) -> None:
    store, e = await _commit(tmp_path, RpcError("PreconditionFailed", "no"))
    assert isinstance(e, S3Error) and e.code == "PreconditionFailed"
    assert not await _exists(store, "blobs/0001/ab/x-ab")


@pytest.mark.parametrize(
    "exc",
    [RpcTimeout("no answer"), Unavailable("partition 1: no owner answered")],
    ids=["timeout", "unavailable"],
)
async def test_an_unknown_outcome_keeps_the_blob(tmp_path: Path, exc: BaseException) -> None:
    store, e = await _commit(tmp_path, exc)
    assert type(e) is type(exc)
    assert await _exists(store, "blobs/0001/ab/x-ab")
