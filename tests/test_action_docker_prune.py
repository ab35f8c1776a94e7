"""The `docker_prune` action against a real dockerd that these tests start (vfs, no networking),
reached the way a production host's daemon is: through the sshd fleet, over the bot's own SSH
connection, at the daemon's socket path on the host (fleet hosts are this machine). Images are
made with `docker import` from tiny tars, containers are created (never run), and "old" comes
from the action's injectable clock, not from waiting.

Without dockerd these tests FAIL with the install hint (Debian package docker.io); set
MAINTENANCEBOT_SKIP_DOCKER=1 to skip them on a machine that cannot run Docker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker  # type: ignore[import-untyped,unused-ignore]
import pytest

from maintenancebot.actions import ActionContext, ActionReport, action_arg_errors
from maintenancebot.actions.docker_prune import (
    DockerPruneAction,
    DockerPruneArgs,
    _ApiError,
    _names,
    _remove,
    select,
)
from maintenancebot.testing.dockerd import Dockerd, DockerdError
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport

DAY = 86400.0


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    if os.environ.get("MAINTENANCEBOT_SKIP_DOCKER") == "1":
        pytest.skip("MAINTENANCEBOT_SKIP_DOCKER=1")
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"))
    problem = ""
    try:
        daemon.start()
    except DockerdError as exc:
        problem = str(exc)
    if problem:  # outside the except block, so the report is this one line
        pytest.fail(f"cannot start dockerd for the docker_prune tests: {problem} "
                    "(or set MAINTENANCEBOT_SKIP_DOCKER=1)", pytrace=False)
    yield daemon
    daemon.stop()


@pytest.fixture
def api(dockerd: Dockerd) -> Iterator[Any]:
    """The SDK straight on the daemon's socket, to set up and inspect; the daemon starts empty."""
    client = docker.APIClient(base_url=dockerd.url)
    for container in client.containers(all=True):
        client.remove_container(container["Id"], force=True)
    for image in client.images(all=True):
        client.remove_image(image["Id"], force=True)
    for volume in client.volumes().get("Volumes") or []:
        client.remove_volume(volume["Name"], force=True)
    yield client
    client.close()


@pytest.fixture
def transport(fleet: Fleet) -> Iterator[Transport]:
    conn = open_transport(fleet.hosts[1], fleet.ssh_settings)
    conn.connect()
    yield conn
    conn.close()


def image(api: Any, ref: str | None, size: int = 4096) -> str:
    """`docker import` of a tar with one file of `size` bytes; `ref` None makes it untagged."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(f"data-{ref}")
        info.size = size
        archive.addfile(info, io.BytesIO(os.urandom(size)))
    repo, _, tag = (ref or "").partition(":")
    answer = api.import_image_from_data(buffer.getvalue(), repository=repo or None,
                                        tag=tag or None)
    image_id: str = json.loads(answer.strip().splitlines()[-1])["status"]  # {"status": id}
    return image_id


def container(api: Any, image_ref: str, **host: Any) -> str:
    config = api.create_host_config(network_mode="none", **host)
    return str(api.create_container(image_ref, command="/none", host_config=config)["Id"])


def ctx() -> ActionContext:
    return ActionContext(run_id="t", step_index=0, step_name="prune", sudo=False, timeout=60,
                         dry_run=False)


def prune(transport: Transport, dockerd: Dockerd, *, apply: bool = False, later: float = 3 * DAY,
          **args: Any) -> ActionReport:
    """Preview (or apply) with the clock `later` seconds ahead of now."""
    action = DockerPruneAction(clock=lambda: time.time() + later)
    parsed = DockerPruneArgs.model_validate({"socket": dockerd.socket, **args})
    run = action.apply if apply else action.preview
    return run(transport, parsed, ctx())


def tags_left(api: Any) -> list[str]:
    return sorted(t for i in api.images() for t in i.get("RepoTags") or [] if t != "<none>:<none>")


@pytest.fixture
def world(api: Any) -> dict[str, str]:
    """Two unused images (one with two tags), one untagged, one kept by name, one in use."""
    ids = {"old": image(api, "shop/old:1", 8192), "twice": image(api, "shop/twice:1"),
           "dangling": image(api, None), "pinned": image(api, "db/postgres:15"),
           "used": image(api, "shop/used:1")}
    api.tag(ids["twice"], "shop/twice", "2")
    ids["container"] = container(api, "shop/used:1")
    return ids


# ------------------------------------------------------------------------------ over SSH


def test_preview_lists_exactly_what_would_go_with_sizes_and_changes_nothing(
    api: Any, dockerd: Dockerd, transport: Transport, world: dict[str, str]
) -> None:
    before = tags_left(api)
    report = prune(transport, dockerd, keep=["db/*"])
    assert report.ok and report.changed is False
    going = {i["id"]: i for i in report.data["images"]}
    assert set(going) == {world["old"], world["twice"], world["dangling"]}
    assert going[world["twice"]]["tags"] == ["shop/twice:1", "shop/twice:2"]
    assert going[world["old"]]["size"] >= 8192 and going[world["old"]]["created"].endswith("Z")
    kept = {i["id"]: i["reason"] for i in report.data["kept"]}
    assert kept == {world["pinned"]: "keep: db/*", world["used"]: "in use by a container or image"}
    assert report.data["containers"] == [] and report.data["volumes"] == []
    assert report.summary.startswith("irreversible: 3 image(s) would be deleted")
    assert report.data["estimated_bytes"] >= 8192 + 2 * 4096
    assert tags_left(api) == before and len(api.images()) == 5


def test_apply_deletes_them_and_reports_the_bytes_reclaimed(
    api: Any, dockerd: Dockerd, transport: Transport, world: dict[str, str]
) -> None:
    preview = prune(transport, dockerd, keep=["db/*"])
    report = prune(transport, dockerd, apply=True, keep=["db/*"])
    assert report.ok and report.changed
    assert [i["id"] for i in report.data["images"]] == [i["id"] for i in preview.data["images"]]
    assert tags_left(api) == ["db/postgres:15", "shop/used:1"]
    assert {i["Id"] for i in api.images(all=True)} == {world["pinned"], world["used"]}
    assert report.data["reclaimed_bytes"] >= 8192 + 2 * 4096
    assert report.data["skipped"] == [] and report.data["failed"] == []
    assert "deleted 3 image(s)" in report.summary
    again = prune(transport, dockerd, apply=True, keep=["db/*"])
    assert again.changed is False and again.data["reclaimed_bytes"] == 0


def test_min_age_counts_from_the_latest_tag(api: Any, dockerd: Dockerd,
                                            transport: Transport) -> None:
    old, retagged = image(api, "app:old"), image(api, "app:retagged")
    time.sleep(1.2)
    api.tag(retagged, "app", "current")  # tagged just now: in use by a deploy, say
    # The clock says 48h minus 0.6s have passed since now: only what is older than 0.6s goes.
    report = prune(transport, dockerd, later=2 * DAY - 0.6, min_age="48h")
    assert [i["id"] for i in report.data["images"]] == [old]
    assert report.data["kept"] == [{**report.data["kept"][0], "reason": "younger than 2d"}]
    assert report.data["kept"][0]["id"] == retagged


def test_old_stopped_containers_go_and_free_their_image(
    api: Any, dockerd: Dockerd, transport: Transport, world: dict[str, str]
) -> None:
    report = prune(transport, dockerd, apply=True, keep=["db/*"], containers_older_than="1d")
    assert [c["id"] for c in report.data["containers"]] == [world["container"]]
    assert report.data["containers"][0]["state"] == "created"
    assert world["used"] in {i["id"] for i in report.data["images"]}
    assert api.containers(all=True) == [] and tags_left(api) == ["db/postgres:15"]


def test_dangling_only_leaves_tagged_images(api: Any, dockerd: Dockerd, transport: Transport,
                                            world: dict[str, str]) -> None:
    report = prune(transport, dockerd, apply=True, dangling_only=True)
    assert [i["id"] for i in report.data["images"]] == [world["dangling"]]
    assert len(tags_left(api)) == 5


def test_volumes_go_only_when_asked_and_named_ones_only_when_named(
    api: Any, dockerd: Dockerd, transport: Transport
) -> None:
    anonymous = api.create_volume()["Name"]
    api.create_volume("pgdata")
    image(api, "app:1")
    container(api, "app:1", binds={"mounted": {"bind": "/data", "mode": "rw"}})
    assert prune(transport, dockerd).data["volumes"] == []
    report = prune(transport, dockerd, apply=True, volumes=True)
    assert [v["name"] for v in report.data["volumes"]] == [anonymous]
    assert sorted(v["Name"] for v in api.volumes()["Volumes"]) == ["mounted", "pgdata"]
    named = prune(transport, dockerd, volumes=True, named_volumes=True)
    assert [v["name"] for v in named.data["volumes"]] == ["pgdata"]


def test_an_unreachable_daemon_fails_the_step_clearly(dockerd: Dockerd, transport: Transport,
                                                      tmp_path: Path) -> None:
    report = prune(transport, dockerd, socket=str(tmp_path / "docker.sock"))
    assert report.ok is False
    assert report.summary == (f"docker_prune failed: cannot reach the Docker daemon at "
                              f"{tmp_path}/docker.sock: No such file or directory")


# ------------------------------------------------------------------------------ pure


def snapshot(**extra: Any) -> dict[str, Any]:
    images = [
        {"Id": "sha256:" + "a" * 64, "RepoTags": ["nginx:1.25"], "Created": 0, "Size": 100,
         "SharedSize": 40, "RepoDigests": ["nginx@sha256:" + "d" * 64]},
        {"Id": "sha256:" + "b" * 64, "RepoTags": ["app:1"], "Created": 0, "Size": 10,
         "ParentId": "sha256:" + "c" * 64},
        {"Id": "sha256:" + "c" * 64, "RepoTags": None, "Created": 0, "Size": 5},
    ]
    containers = [{"Id": "r", "State": "running", "ImageID": "sha256:" + "b" * 64, "Created": 0},
                  {"Id": "p", "State": "paused", "ImageID": "sha256:" + "b" * 64, "Created": 0}]
    return {"Images": images, "Containers": containers, "Volumes": [], **extra}


def test_selection_never_takes_running_containers_or_parents_of_kept_images() -> None:
    args = DockerPruneArgs(containers_older_than=1)
    chosen = select(snapshot(), args, now=10 * DAY, last_used={})
    assert chosen.containers == []
    assert [i["id"][7:8] for i in chosen.images] == ["a"]
    assert chosen.images[0]["size"] == 60  # shared bytes stay while another image holds them
    assert {i["id"][7:8]: i["reason"] for i in chosen.kept} == {
        "b": "in use by a container or image", "c": "in use by a container or image"}


@pytest.mark.parametrize("pattern", ["nginx", "nginx:1.*", "nginx@sha256:*", "aaaaaaaaaaaa",
                                     "sha256:a*", "docker.io/library/nginx:*"])
def test_keep_matches_repo_tag_digest_or_id(pattern: str) -> None:
    chosen = select(snapshot(), DockerPruneArgs(keep=(pattern,)), now=10 * DAY, last_used={})
    assert chosen.images == []


def test_a_registry_reference_is_not_qualified_again() -> None:
    image = {"Id": "sha256:" + "e" * 64, "RepoTags": ["registry.local:5000/app:2", "me/tool:1"]}
    names = _names(image)
    assert {"registry.local:5000/app", "registry.local:5000/app:2", "docker.io/me/tool:1",
            "docker.io/me/tool", "eeeeeeeeeeee"} <= names
    assert "docker.io/registry.local:5000/app:2" not in names


def test_a_removal_refused_because_of_new_use_is_skipped_not_failed() -> None:
    class Api:
        def remove(self, kind: str, ref: str) -> None:
            status = {"image": 409, "container": 500, "volume": 404}[kind]
            raise _ApiError(f"cannot remove {kind} {ref}", status)

    chosen = select(snapshot(Volumes=[{"Name": "f" * 64}]), DockerPruneArgs(volumes=True),
                    now=10 * DAY, last_used={})
    chosen.containers = [{"id": "x", "size": 0}]
    done, problems = _remove(Api(), chosen)  # type: ignore[arg-type]
    assert [p["kind"] for p in problems["skipped"]] == ["image"]
    assert [p["kind"] for p in problems["failed"]] == ["container"]
    assert [v["name"] for v in done.volumes] == ["f" * 64]  # already gone counts as gone


def test_arguments_and_rollback_say_what_cannot_be() -> None:
    assert action_arg_errors("docker_prune", {"min_age": "72h", "keep": ["nginx:*"]}) == []
    assert "named_volumes" in str(action_arg_errors("docker_prune", {"named_volumes": True}))
    assert action_arg_errors("docker_prune", {"socket": "docker.sock"})
    assert action_arg_errors("docker_prune", {"min_age": "soon"})
    assert action_arg_errors("docker_prune", {"force": True})[0][0] == ("force",)
    report = ActionReport(ok=True, changed=True, summary="", data={"images": [{}, {}]})
    undo = DockerPruneAction().rollback(None, DockerPruneArgs(), report, ctx())  # type: ignore[arg-type]
    assert undo.ok is False and undo.summary.startswith("irreversible: 2 deleted image(s)")


def test_loading_the_actions_does_not_import_the_docker_sdk() -> None:
    code = ("import sys; from maintenancebot.actions import get_action; "
            "assert get_action('docker_prune'); "
            "print(sorted(m for m in ('docker', 'requests', 'paramiko') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_throwaway_daemon_seeds_images_and_containers_itself(dockerd: Dockerd,
                                                                api: Any) -> None:
    image_id = dockerd.import_image("demo/web:1", {"index.html": b"hello"})
    container_id = dockerd.create_container("demo/web:1", name="web")
    assert api.inspect_image("demo/web:1")["Id"] == image_id
    assert api.inspect_container("web")["Id"] == container_id
    assert api.inspect_container("web")["State"]["Status"] == "created"


def test_through_the_engine_the_dry_run_lists_and_the_real_run_deletes(
    fleet: Fleet, dockerd: Dockerd, api: Any, tmp_path: Path
) -> None:
    pytest.importorskip("maintenancebot.store", reason="the run store is not written yet")
    from tests.harness import Bench

    old = image(api, "shop/old:1")
    image(api, "db/postgres:15")
    bench = Bench(fleet, tmp_path)
    runbook = f"""
        hosts: {fleet.names[0]}
        steps:
          - name: Docker cleanup
            action: docker_prune
            with: {{socket: "{dockerd.socket}", min_age: 1ms, keep: ["db/*"]}}
    """
    dry = bench.run(runbook, dry_run=True)
    (step,) = bench.steps(dry.run_id, fleet.names[0])
    assert step["status"] == "would_run" and step["details"]["estimated_bytes"] >= 4096
    assert [i["id"] for i in step["details"]["images"]] == [old]
    assert len(tags_left(api)) == 2
    real = bench.run(runbook)
    (step,) = bench.steps(real.run_id, fleet.names[0])
    assert step["status"] == "ok" and step["details"]["reclaimed_bytes"] >= 4096
    assert tags_left(api) == ["db/postgres:15"]
