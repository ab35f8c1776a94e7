"""The `docker_prune` action: remove unused Docker images, old stopped containers and (on request)
dangling volumes through the Docker SDK, over the bot's own verified SSH connection.

Owned here: what would go (a pure selection over one `GET /system/df` snapshot plus an inspect of
each candidate, so the dry-run lists exactly the objects and sizes), removing them in a safe order
(containers, then images, then volumes; never `force`, so an object that came into use since the
plan is refused by the daemon and reported as skipped), and the bytes reclaimed (measured: layer
bytes before minus after, plus the removed containers' and volumes' own sizes). Deleted images
cannot come back: the action is not reversible and the preview says so. It must not stop or start
containers, touch running ones, remove named volumes unless `named_volumes: true`, or talk to a
Docker daemon by any other way than the host's socket through our SSH transport.

Why not the SDK's own `ssh://`: docker-py's paramiko adapter reads ~/.ssh/config and the user's
known_hosts, tries the agent and default keys, knows no jump hosts, and needs the docker CLI on
the host (`docker system dial-stdio`). So the SDK gets a requests adapter (`_Relay`) that sends
each HTTP request (with `Connection: close`) through one command on our transport, with its one
SSH policy: a stdlib program on the host passes it to the docker socket and returns the response.
One command per API call: a handful per prune plus one per removed object. The only module that
imports `docker` (lazily, for CLI start-up); the untyped SDK's `Any` stays in `_DockerApi`.

Seams: `socket:` is the daemon's socket path on the host (tests point it at a throwaway dockerd);
`DockerPruneAction(clock=...)` fixes "now" (the controller's clock) to age images without waiting.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._probe import ProbeError, run_python
from maintenancebot.models import Duration, format_duration
from maintenancebot.transports.base import Transport

_STOPPED = ("created", "exited", "dead")  # never running, paused or restarting containers


class DockerPruneArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_age: Duration = 48 * 3600.0  # unused images last created or tagged longer ago
    keep: tuple[str, ...] = ()  # globs on repo:tag, repo, repo@digest or image id
    containers_older_than: Duration | None = None  # stopped containers; unset = keep all
    volumes: bool = False  # dangling (unreferenced) volumes
    named_volumes: bool = False  # with volumes: also named ones (a database's data lives there)
    dangling_only: bool = False  # only untagged images
    socket: Annotated[str, Field(pattern="^/")] = "/var/run/docker.sock"  # on the host

    @model_validator(mode="after")
    def _named_needs_volumes(self) -> DockerPruneArgs:
        if self.named_volumes and not self.volumes:
            raise ValueError("named_volumes: true needs volumes: true")
        return self


class _ApiError(Exception):
    """The daemon refused (`status` is its HTTP status) or could not be reached (None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ the relay

# Runs on the host: one HTTP exchange with the docker socket, request and response as base64.
_RELAY = r"""
import base64, json, socket, sys
req = json.load(sys.stdin)
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(req["timeout"])
    sock.connect(req["socket"])
    sock.sendall(base64.b64decode(req["request"]))
    data = b"".join(iter(lambda: sock.recv(65536), b""))  # the daemon closes when done
except OSError as exc:
    print(json.dumps({"error": "%s: %s" % (req["socket"], exc.strerror or str(exc))}))
else:
    print(json.dumps({"response": base64.b64encode(data).decode()}))
"""


class _Relay:
    """A requests transport adapter (duck-typed, so requests is imported only when used)."""

    def __init__(self, transport: Transport, ctx: ActionContext, socket_path: str) -> None:
        self._transport, self._ctx, self._socket = transport, ctx, socket_path

    def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> Any:
        answer = run_python(self._transport, self._ctx, _RELAY, {
            "socket": self._socket, "timeout": self._ctx.timeout,
            "request": base64.b64encode(_http_request(request)).decode()})
        if "error" in answer:
            raise _ApiError(f"cannot reach the Docker daemon at {answer['error']}")
        return _http_response(request, base64.b64decode(answer["response"]))

    def close(self) -> None:
        """Nothing to release: every request had its own command."""


def _http_request(request: Any) -> bytes:
    body = request.body or b""
    body = body.encode() if isinstance(body, str) else body
    if not isinstance(body, bytes):
        raise _ApiError("streamed request bodies cannot be relayed")
    lines = [f"{request.method} {request.path_url} HTTP/1.1", "Host: docker"]
    lines += [f"{k}: {v}" for k, v in request.headers.items()
              if k.lower() not in ("host", "connection", "content-length", "transfer-encoding")]
    # `close` makes the daemon end the exchange, which is how the relay knows it has it all.
    lines += ["Connection: close", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Bytes(bytes):
    def makefile(self, mode: str) -> io.BytesIO:  # all http.client needs of a socket
        return io.BytesIO(self)


def _http_response(request: Any, raw: bytes) -> Any:
    import requests  # type: ignore[import-untyped,unused-ignore]

    parsed = http.client.HTTPResponse(_Bytes(raw), method=request.method)  # type: ignore[arg-type]
    try:
        parsed.begin()
        body = parsed.read()  # undoes chunked transfer encoding
    except (http.client.HTTPException, OSError) as exc:
        raise _ApiError(f"garbled answer from the Docker daemon: {exc!r}") from exc
    response = requests.Response()
    response.status_code, response.reason = parsed.status, parsed.reason
    response.headers = requests.structures.CaseInsensitiveDict(parsed.getheaders())
    response.raw, response.url, response.request = io.BytesIO(body), request.url, request
    return response


class _DockerApi:
    """The SDK's low-level client over `_Relay`, as plain dicts, its errors as `_ApiError`."""

    _URL = "tcp://localhost:2375"  # a placeholder: `_Relay` carries every request

    def __init__(self, transport: Transport, ctx: ActionContext, socket_path: str) -> None:
        relay = _Relay(transport, ctx, socket_path)
        probe = self._client(relay, "1.24")
        # The same negotiation as the SDK's version="auto", after our adapter is mounted.
        version = self._call(probe.version, api_version=False)["ApiVersion"]
        self._api = self._client(relay, version)

    def _client(self, relay: _Relay, version: str) -> Any:
        import docker  # type: ignore[import-untyped,unused-ignore]

        api = docker.APIClient(base_url=self._URL, version=version)
        api.trust_env = False  # no proxy or netrc from the environment: nothing goes over TCP
        api.mount("http://localhost:2375", relay)
        return api

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import docker
        import requests  # type: ignore[import-untyped,unused-ignore]

        try:
            return method(*args, **kwargs)
        except docker.errors.APIError as exc:
            raise _ApiError(str(exc.explanation or exc), exc.status_code) from exc
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise _ApiError(str(exc)) from exc

    def df(self) -> dict[str, Any]:
        return dict(self._call(self._api.df))

    def inspect(self, kind: str, ref: str) -> dict[str, Any]:
        return dict(self._call(getattr(self._api, f"inspect_{kind}"), ref))

    def remove(self, kind: str, ref: str) -> None:
        # Never `force`: the daemon then refuses anything in use. A container's volumes stay.
        self._call(getattr(self._api, f"remove_{kind}"), ref)


# ------------------------------------------------------------------------------ selection (pure)


@dataclass
class Selection:
    containers: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)  # images, with the reason

    def bytes(self) -> int:
        return sum(item["size"] or 0 for item in [*self.containers, *self.images, *self.volumes])


def select(df: dict[str, Any], args: DockerPruneArgs, now: float,
           last_used: dict[str, float]) -> Selection:
    """What goes, from a `/system/df` snapshot. `last_used` maps ids to the latest of created,
    tagged (images) or finished (containers); ids without an entry count from their creation."""
    chosen = Selection()
    containers, images = _oldest_first(df.get("Containers")), _oldest_first(df.get("Images"))
    for container in containers:
        if _stale_container(container, args, now, last_used):
            chosen.containers.append(_container_row(container))
    removed = {c["id"] for c in chosen.containers}
    remaining = [c for c in containers if c["Id"] not in removed]
    # An image a container (not going) runs from, or another image builds on, stays.
    used: set[str] = {c["ImageID"] for c in remaining} | {i.get("ParentId") or "" for i in images}
    for image in images:
        reason = _image_kept_because(image, args, now, last_used, used)
        (chosen.kept if reason else chosen.images).append(_image_row(image, reason))
    if args.volumes:
        mounted = {m.get("Name") for c in remaining for m in c.get("Mounts") or []}
        volumes = sorted(df.get("Volumes") or [], key=lambda v: str(v["Name"]))
        chosen.volumes = [_volume_row(v) for v in volumes
                          if v["Name"] not in mounted and (args.named_volumes or _anonymous(v))]
    return chosen


def _oldest_first(items: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The daemon lists in no stable order; reports (and their diffs) should not change."""
    return sorted(items or [], key=lambda item: (item.get("Created", 0), item["Id"]))


def _stale_container(container: dict[str, Any], args: DockerPruneArgs, now: float,
                     last_used: dict[str, float]) -> bool:
    if args.containers_older_than is None or container.get("State") not in _STOPPED:
        return False
    since = last_used.get(container["Id"], float(container.get("Created", now)))
    return now - since > args.containers_older_than


def _image_kept_because(image: dict[str, Any], args: DockerPruneArgs, now: float,
                        last_used: dict[str, float], used: set[str]) -> str | None:
    if image["Id"] in used:
        return "in use by a container or image"
    names = _names(image)
    pattern = next((p for p in args.keep if any(fnmatchcase(n, p) for n in names)), None)
    if pattern is not None:
        return f"keep: {pattern}"
    if args.dangling_only and _tags(image):
        return "tagged (dangling_only)"
    since = last_used.get(image["Id"], float(image.get("Created", now)))
    if now - since <= args.min_age:
        return f"younger than {format_duration(args.min_age)}"
    return None


def _tags(image: dict[str, Any]) -> list[str]:
    return [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]


def _names(image: dict[str, Any]) -> set[str]:
    """Every name `keep` can match: repo:tag, repo, repo@digest (each also fully qualified, as
    docker.io/library/nginx:1.25), the id and its short form."""
    refs = _tags(image) + [d for d in image.get("RepoDigests") or [] if d[:6] != "<none>"]
    refs += [_qualified(ref) for ref in refs]
    names = set(refs) | {r.rpartition(":")[0] for r in refs if "@" not in r}
    return names | {image["Id"], image["Id"].removeprefix("sha256:")[:12]}


def _qualified(ref: str) -> str:
    """`nginx:1` -> `docker.io/library/nginx:1`, `me/app` -> `docker.io/me/app`, as Docker reads
    them; a reference that names a registry (a dot, a port, localhost) stays as it is."""
    first, slash, _ = ref.partition("/")
    if not slash:
        return f"docker.io/library/{ref}"
    registry = "." in first or ":" in first or first == "localhost"
    return ref if registry else f"docker.io/{ref}"


def _anonymous(volume: dict[str, Any]) -> bool:
    """Docker 23+ labels anonymous volumes; older daemons named them with 64 hex digits."""
    return ("com.docker.volume.anonymous" in (volume.get("Labels") or {})
            or re.fullmatch("[0-9a-f]{64}", volume["Name"]) is not None)


def _image_row(image: dict[str, Any], reason: str | None) -> dict[str, Any]:
    size = image.get("Size", 0) - max(0, image.get("SharedSize", -1))  # bytes only it holds
    row = {"id": image["Id"], "tags": _tags(image), "size": size,
           "created": _iso(image.get("Created"))}
    return {**row, "reason": reason} if reason else row


def _container_row(container: dict[str, Any]) -> dict[str, Any]:
    names = [n.lstrip("/") for n in container.get("Names") or []]
    return {"id": container["Id"], "name": names[0] if names else "", "state": container["State"],
            "image": container.get("Image"), "size": container.get("SizeRw", 0),
            "created": _iso(container.get("Created"))}


def _volume_row(volume: dict[str, Any]) -> dict[str, Any]:
    size = (volume.get("UsageData") or {}).get("Size", -1)
    return {"name": volume["Name"], "size": size if size >= 0 else None}


def _iso(epoch: object) -> str | None:
    stamp = time.gmtime(epoch) if isinstance(epoch, int | float) else None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp) if stamp else None


def _epoch(stamp: object) -> float | None:
    """Docker's RFC 3339 times; its zero time (0001-01-01) means never."""
    if not isinstance(stamp, str) or not stamp or stamp.startswith("0001-"):
        return None
    return datetime.fromisoformat(stamp).timestamp()


# ------------------------------------------------------------------------------ the action


class DockerPruneAction:
    name: ClassVar[str] = "docker_prune"
    Args: ClassVar[type[BaseModel]] = DockerPruneArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = False  # a deleted image is gone

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def preview(self, transport: Transport, args: DockerPruneArgs, ctx: ActionContext
                ) -> ActionReport:
        try:
            _, chosen = self._plan(_DockerApi(transport, ctx, args.socket), args)
        except (_ApiError, ProbeError) as exc:
            return _failure(exc)
        data = {**_listing(chosen), "estimated_bytes": chosen.bytes(), "kept": chosen.kept}
        return ActionReport(ok=True, changed=False, summary=_preview_summary(chosen), data=data)

    def apply(self, transport: Transport, args: DockerPruneArgs, ctx: ActionContext
              ) -> ActionReport:
        try:
            api = _DockerApi(transport, ctx, args.socket)
            df, chosen = self._plan(api, args)
            done, problems = _remove(api, chosen)
            after = api.df()
        except (_ApiError, ProbeError) as exc:
            return _failure(exc)
        layers = max(0, int(df.get("LayersSize", 0)) - int(after.get("LayersSize", 0)))
        reclaimed = layers + sum(i["size"] or 0 for i in [*done.containers, *done.volumes])
        summary = (f"deleted {len(done.images)} image(s), {len(done.containers)} container(s), "
                   f"{len(done.volumes)} volume(s); reclaimed {_size(reclaimed)}")
        skipped, failed = problems["skipped"], problems["failed"]
        if skipped or failed:
            summary += f"; {len(skipped)} skipped (in use now), {len(failed)} failed"
        changed = bool(done.images or done.containers or done.volumes)
        return ActionReport(ok=not failed, changed=changed, summary=summary, data={
            **_listing(done), "reclaimed_bytes": reclaimed, **problems})

    def rollback(self, transport: Transport, args: DockerPruneArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        count = len(report.data.get("images", []))
        return ActionReport(ok=False, changed=False, summary=(
            f"irreversible: {count} deleted image(s) cannot be restored (pull them again)"))

    def _plan(self, api: _DockerApi, args: DockerPruneArgs) -> tuple[dict[str, Any], Selection]:
        """Select by creation time first, then inspect only those candidates for the later
        of tagged/finished, which can only keep more: one inspect per candidate, not per object."""
        df, now = api.df(), self.clock()
        rough = select(df, args, now, {})
        last_used = {c["id"]: _latest(api.inspect("container", c["id"]), "State", "FinishedAt")
                     for c in rough.containers}
        last_used |= {i["id"]: _latest(api.inspect("image", i["id"]), "Metadata", "LastTagTime")
                      for i in rough.images}
        return df, select(df, args, now, last_used)


def _latest(inspected: dict[str, Any], section: str, key: str) -> float:
    """The later of an object's creation and its last tag (image) or finish (container)."""
    stamps = [_epoch(inspected.get("Created")), _epoch((inspected.get(section) or {}).get(key))]
    return max((s for s in stamps if s is not None), default=0.0)


Problems = dict[str, list[dict[str, Any]]]


def _remove(api: _DockerApi, chosen: Selection) -> tuple[Selection, Problems]:
    """Containers, then images, then volumes: what went, and what was skipped or failed."""
    done = Selection()
    problems: Problems = {"skipped": [], "failed": []}
    for kind, items, went in (("container", chosen.containers, done.containers),
                              ("image", chosen.images, done.images),
                              ("volume", chosen.volumes, done.volumes)):
        for item in items:
            if _attempt(api, problems, kind, item):
                went.append(item)
    return done, problems


def _attempt(api: _DockerApi, problems: Problems, kind: str, item: dict[str, Any]) -> bool:
    key = item.get("id") or item["name"]
    # Images go tag by tag: one with several tags cannot be deleted by id without `force`, and
    # the last tag takes the image with it. An untagged image goes by id.
    for ref in item.get("tags") or [key]:
        try:
            api.remove(kind, ref)
        except _ApiError as exc:
            if exc.status == 404:
                continue  # gone already: what we wanted
            # 409: it came into use since the plan, and the daemon refused (we never force).
            problems["skipped" if exc.status == 409 else "failed"].append(
                {"kind": kind, "id": key, "error": str(exc)})
            return False
        except ProbeError as exc:  # keep the report of what already went
            problems["failed"].append({"kind": kind, "id": key, "error": str(exc)})
            return False
    return True


def _listing(chosen: Selection) -> dict[str, Any]:
    return {"images": chosen.images, "containers": chosen.containers, "volumes": chosen.volumes}


def _preview_summary(chosen: Selection) -> str:
    if not (chosen.images or chosen.containers or chosen.volumes):
        return f"nothing to prune ({len(chosen.kept)} image(s) kept)"
    return (f"irreversible: {len(chosen.images)} image(s) would be deleted, "
            f"{len(chosen.containers)} stopped container(s) and {len(chosen.volumes)} volume(s) "
            f"removed; about {_size(chosen.bytes())} ({len(chosen.kept)} image(s) kept)")


def _failure(exc: Exception) -> ActionReport:
    return ActionReport(ok=False, changed=False, summary=f"docker_prune failed: {exc}",
                        data={"error": str(exc)})


def _size(count: int) -> str:
    return f"{count / 1048576:.1f} MiB" if count >= 1048576 else f"{count / 1024:.1f} KiB"


register_action(DockerPruneAction())
