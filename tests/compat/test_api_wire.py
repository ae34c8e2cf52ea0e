"""Our .proto files against containerd's own, compared as compiled descriptors.

Both sides are compiled with grpc_tools.protoc into FileDescriptorSets. For every protobuf
package of containerd's set, every message (with nested messages and map entries), enum and
service must exist in ours under the same full name with the same wire facts: field numbers,
names, types, labels and type names; method input/output types and streaming flags; enum values.
Whatever differs does not interoperate with the real ctr, containerd or Go shim.

gogoproto options are the only thing we drop on purpose: they shape Go code, not the wire.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GO_SRC = Path(os.environ.get("PYCONTAINERD_GO_SRC", "/usr/share/gocode/src"))
CONTAINERD = GO_SRC / "github.com/containerd/containerd"

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not CONTAINERD.is_dir(), reason=f"containerd Go sources not at {CONTAINERD}"),
]

# containerd's proto files we mirror, relative to the containerd source tree.
GO_FILES = [
    "api/types/descriptor.proto",
    "api/types/metrics.proto",
    "api/types/mount.proto",
    "api/types/platform.proto",
    "api/types/task/task.proto",
    "api/events/container.proto",
    "api/events/content.proto",
    "api/events/image.proto",
    "api/events/namespace.proto",
    "api/events/snapshot.proto",
    "api/events/task.proto",
    "api/services/events/v1/events.proto",
    "api/services/introspection/v1/introspection.proto",
    "api/services/leases/v1/leases.proto",
    "api/services/namespaces/v1/namespace.proto",
    "api/services/ttrpc/events/v1/events.proto",
    "api/services/version/v1/version.proto",
    "runtime/v2/task/shim.proto",
    "api/services/containers/v1/containers.proto",
    "api/services/content/v1/content.proto",
    "api/services/diff/v1/diff.proto",
    "api/services/images/v1/images.proto",
    "api/services/snapshots/v1/snapshots.proto",
    "api/services/tasks/v1/tasks.proto",
    "runtime/v1/shim/v1/shim.proto",
    "runtime/v2/runc/options/oci.proto",
    "runtime/linux/runctypes/runc.proto",
]

# Packages in their set that are only there as imports and carry no wire facts of their own.
NOT_MIRRORED = {"gogoproto", "google.protobuf", "containerd.plugin"}

GOGO_CANDIDATES = [GO_SRC / "github.com/gogo/protobuf", CONTAINERD / "vendor/github.com/gogo/protobuf"]
GOOGLEAPIS_CANDIDATES = [GO_SRC / "github.com/gogo/googleapis", CONTAINERD / "vendor/github.com/gogo/googleapis"]
HEALTH_CANDIDATES = [
    GO_SRC / "google.golang.org/grpc/health/grpc_health_v1",
    GO_SRC / "google.golang.org/grpc/debian/missing-sources/grpc/grpc-proto/master/grpc/health/v1",
]

# Used only when an import of theirs is nowhere on disk; these facts come from the upstream files.
STUBS = {
    "google/rpc/status.proto": (
        'syntax = "proto3";\npackage google.rpc;\nimport "google/protobuf/any.proto";\n'
        "message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }\n"
    ),
}


def _protoc(includes: list[Path], files: list[str], out: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{i}" for i in [*includes, well_known]),
           "--include_imports", f"--descriptor_set_out={out}", *files]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"protoc failed:\n{done.stderr}"


def _load(path: Path):
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(path.read_bytes())
    return fds


def _first_dir(candidates: list[Path], rel: str) -> Path | None:
    return next((c for c in candidates if (c / rel).is_file()), None)


def _strip_gogo(text: str) -> str:
    """Drop gogoproto imports and options from a .proto (fallback when gogo.proto is missing)."""
    text = re.sub(r'^\s*import\s+(weak\s+)?"gogoproto/gogo\.proto";\s*$', "", text, flags=re.M)
    text = re.sub(r"^\s*option\s+\(gogoproto\.[^;]*;\s*$", "", text, flags=re.M)

    def options(match: re.Match) -> str:
        kept = [o for o in match.group(1).split(",") if "gogoproto." not in o]
        return f" [{','.join(kept)}]" if kept else ""

    return re.sub(r"\s*\[([^\]]*)\]", options, text)


@pytest.fixture(scope="module")
def their_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("theirs")
    stubs = tmp / "stubs"
    includes = [GO_SRC]
    files = [f"github.com/containerd/containerd/{f}" for f in GO_FILES]

    gogo = _first_dir(GOGO_CANDIDATES, "gogoproto/gogo.proto")
    if gogo is None:
        # Copy their files without gogoproto annotations; the wire facts are untouched.
        stripped = tmp / "stripped"
        for f in files:
            dst = stripped / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_strip_gogo((GO_SRC / f).read_text()))
        fieldpath = "github.com/containerd/containerd/protobuf/plugin/fieldpath.proto"
        (stripped / fieldpath).parent.mkdir(parents=True, exist_ok=True)
        (stripped / fieldpath).write_text((GO_SRC / fieldpath).read_text())
        includes = [stripped]
    else:
        includes.append(gogo)

    googleapis = _first_dir(GOOGLEAPIS_CANDIDATES, "google/rpc/status.proto")
    if googleapis is not None:
        includes.append(googleapis)
    for rel, text in STUBS.items():
        if not any((i / rel).is_file() for i in includes):
            (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
            (stubs / rel).write_text(text)
    includes.append(stubs)

    health_dir = next((c for c in HEALTH_CANDIDATES if (c / "health.proto").is_file()), None)
    if health_dir is not None:
        # Give it the import path "grpc/health/v1/health.proto", as ours has.
        (stubs / "grpc/health/v1").mkdir(parents=True, exist_ok=True)
        (stubs / "grpc/health/v1/health.proto").write_text((health_dir / "health.proto").read_text())
        files.append("grpc/health/v1/health.proto")

    out = tmp / "theirs.pb"
    _protoc(includes, files, out)
    return _load(out)


@pytest.fixture(scope="module")
def our_set(tmp_path_factory):
    from pycontainerd.api.generate import descriptor_set

    out = tmp_path_factory.mktemp("ours") / "ours.pb"
    descriptor_set(out)
    return _load(out)


def _facts(fds) -> dict[str, dict[str, object]]:
    """package -> {kind:full_name -> comparable wire facts} for every message, enum and service."""
    by_package: dict[str, dict[str, object]] = {}

    def enum_facts(e):
        return sorted((v.name, v.number) for v in e.value)

    def field_facts(f):
        packed = f.options.packed if f.options.HasField("packed") else None
        oneof = f.oneof_index if f.HasField("oneof_index") else None
        return (f.number, f.name, f.label, f.type, f.type_name, packed, oneof, f.proto3_optional)

    def walk(facts, prefix, messages, enums):
        for e in enums:
            facts[f"enum {prefix}{e.name}"] = enum_facts(e)
        for m in messages:
            name = f"{prefix}{m.name}"
            facts[f"message {name}"] = {
                "fields": sorted(field_facts(f) for f in m.field),
                "oneofs": [o.name for o in m.oneof_decl],
                "map_entry": m.options.map_entry,
            }
            walk(facts, f"{name}.", m.nested_type, m.enum_type)

    for f in fds.file:
        facts = by_package.setdefault(f.package, {})
        walk(facts, f".{f.package}.", f.message_type, f.enum_type)
        for s in f.service:
            facts[f"service .{f.package}.{s.name}"] = sorted(
                (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in s.method
            )
    return by_package


def _differences(theirs: dict[str, object], ours: dict[str, object]) -> list[str]:
    problems = []
    for key, want in sorted(theirs.items()):
        if key not in ours:
            problems.append(f"missing {key}")
            continue
        got = ours[key]
        if got == want:
            continue
        if key.startswith("message "):
            for part in ("fields", "oneofs", "map_entry"):
                if got[part] != want[part]:
                    missing = [x for x in want[part] if x not in got[part]] if part == "fields" else want[part]
                    extra = [x for x in got[part] if x not in want[part]] if part == "fields" else got[part]
                    problems.append(f"{key}: {part} differ; theirs only {missing}, ours only {extra}")
        else:
            problems.append(f"{key}: theirs {want}, ours {got}")
    for key in sorted(set(ours) - set(theirs)):
        problems.append(f"extra {key} (not in containerd)")
    return problems


def test_every_package_of_theirs_is_mirrored(their_set, our_set):
    theirs, ours = _facts(their_set), _facts(our_set)
    missing = sorted(p for p in theirs if p not in NOT_MIRRORED and p not in ours)
    assert not missing, f"packages of containerd's protos we do not have: {missing}"


def test_wire_facts_match(their_set, our_set):
    theirs, ours = _facts(their_set), _facts(our_set)
    problems = []
    for package in sorted(set(theirs) - NOT_MIRRORED):
        problems += [f"[{package}] {p}" for p in _differences(theirs[package], ours.get(package, {}))]
    assert not problems, "our protos differ from containerd's on the wire:\n" + "\n".join(problems)


def test_comparison_catches_a_difference(their_set, our_set):
    """The comparison itself must notice a changed field number (guards against a vacuous pass)."""
    from google.protobuf import descriptor_pb2

    changed = descriptor_pb2.FileDescriptorSet()
    changed.CopyFrom(our_set)
    target = next(f for f in changed.file if f.package == "containerd.types" and f.message_type)
    target.message_type[0].field[0].number += 100
    theirs = _facts(their_set)["containerd.types"]
    assert _differences(theirs, _facts(changed)["containerd.types"])
    assert not _differences(theirs, _facts(our_set)["containerd.types"])
