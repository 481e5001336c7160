#!/usr/bin/env python3
"""Checks an Envoy bootstrap (YAML) against Envoy's v3 API without Envoy.

Every field name, nested message, enum value and typed_config "@type" is looked up in Envoy's
own .proto files (the copy the envoy-types crate ships, found through `cargo metadata`, or
--protos DIR). It catches misspelled or misplaced fields, wrong enum names and unknown types:
what `envoy --mode validate` would refuse on names and types. It does not check value ranges
or cross-field rules (PGV annotations); run `envoy --mode validate -c FILE` where Envoy is
installed.

Usage: validate.py [--protos DIR] envoy.yaml   (exit 0: valid; 1: problems, listed; 2: cannot run)
"""

import glob
import json
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError:
    print("validate.py needs PyYAML: apt-get install python3-yaml (or pip install pyyaml)", file=sys.stderr)
    sys.exit(2)

SCALARS = {"double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
           "fixed64", "sfixed32", "sfixed64", "bool", "string", "bytes"}
# Well-known types and how YAML writes them.
WELL_KNOWN = {
    "google.protobuf.Duration": "duration", "google.protobuf.Timestamp": "string",
    "google.protobuf.Struct": "any-json", "google.protobuf.Value": "any-json",
    "google.protobuf.ListValue": "any-json", "google.protobuf.Empty": "empty",
    "google.protobuf.BoolValue": "bool", "google.protobuf.StringValue": "string",
    "google.protobuf.BytesValue": "string", "google.protobuf.UInt32Value": "number",
    "google.protobuf.UInt64Value": "number", "google.protobuf.Int32Value": "number",
    "google.protobuf.Int64Value": "number", "google.protobuf.DoubleValue": "number",
    "google.protobuf.FloatValue": "number", "google.protobuf.Any": "any",
}


def find_protos():
    try:
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--format-version", "1"], capture_output=True, text=True,
            check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout)
        for p in meta["packages"]:
            if p["name"] == "envoy-types":
                d = os.path.join(os.path.dirname(p["manifest_path"]), "proto")
                if os.path.isdir(d):
                    return d
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        pass
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = sorted(glob.glob(os.path.join(home, "registry/src/*/envoy-types-*/proto")))
    return found[-1] if found else None


TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[A-Za-z_][\w.]*|\.[A-Za-z_][\w.]*|-?\d[\w.+-]*|[{}\[\]()<>;=,:/-]')


def tokens(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return TOKEN.findall(text)


class Schema:
    def __init__(self):
        self.messages = {}  # full name -> {field: (type, repeated, map_value_type or None)}
        self.enums = {}  # full name -> set of value names
        self.scopes = {}  # full name -> package-relative scope for resolution

    def load(self, root):
        for path in glob.glob(os.path.join(root, "**/*.proto"), recursive=True):
            with open(path, encoding="utf-8") as f:
                self.parse(tokens(f.read()))

    def parse(self, t):
        package, i = "", 0
        while i < len(t):
            if t[i] == "package":
                package, i = t[i + 1], i + 3
            elif t[i] in ("message", "enum"):
                i = self.block(t, i, package)
            elif t[i] == "{":
                i = skip_braces(t, i)
            else:
                i += 1

    def block(self, t, i, scope):
        kind, name = t[i], t[i + 1]
        full = f"{scope}.{name}" if scope else name
        i += 3  # kind name {
        if kind == "enum":
            values = set()
            while t[i] != "}":
                if t[i] == "option" or t[i] == "reserved":
                    i = skip_statement(t, i)
                elif i + 1 < len(t) and t[i + 1] == "=":
                    values.add(t[i])
                    i = skip_statement(t, i)
                else:
                    i += 1
            self.enums[full] = values
            return i + 1
        fields = {}
        self.messages[full] = fields
        self.scopes[full] = full
        while t[i] != "}":
            word = t[i]
            if word in ("message", "enum"):
                i = self.block(t, i, full)
            elif word in ("option", "reserved", "extensions"):
                i = skip_statement(t, i)
            elif word == "oneof":
                i += 3
                while t[i] != "}":
                    if t[i] == "option":
                        i = skip_statement(t, i)
                    else:
                        i = self.field(t, i, fields, full)
                i += 1
            elif word == "extend":
                i = skip_braces(t, i + 2)
            elif word == ";":
                i += 1
            else:
                i = self.field(t, i, fields, full)
        return i + 1

    def field(self, t, i, fields, scope):
        repeated = False
        if t[i] in ("repeated", "optional", "required"):
            repeated = t[i] == "repeated"
            i += 1
        if t[i] == "map":  # map < K , V > name = N
            value = t[i + 4]
            name = t[i + 6]
            fields[name] = (value, False, scope, True)
        else:
            fields[t[i + 1]] = (t[i], repeated, scope, False)
        return skip_statement(t, i)

    def resolve(self, name, scope):
        if name.startswith("."):
            return name[1:]
        parts = scope.split(".")
        while parts:
            candidate = ".".join(parts + [name])
            if candidate in self.messages or candidate in self.enums or candidate in WELL_KNOWN:
                return candidate
            parts.pop()
        return name


def skip_braces(t, i):
    depth = 0
    while i < len(t):
        if t[i] == "{":
            depth += 1
        elif t[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def skip_statement(t, i):
    depth = 0
    while i < len(t):
        if t[i] in ("{", "["):
            depth += 1
        elif t[i] in ("}", "]"):
            depth -= 1
        elif t[i] == ";" and depth == 0:
            return i + 1
        i += 1
    return i


def camel_to_snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Checker:
    def __init__(self, schema):
        self.s = schema
        self.problems = []

    def bad(self, path, what):
        self.problems.append(f"{path}: {what}")

    def message(self, full, value, path):
        kind = WELL_KNOWN.get(full)
        if kind:
            return self.well_known(full, kind, value, path)
        fields = self.s.messages.get(full)
        if fields is None:
            return self.bad(path, f"unknown message type {full}")
        if not isinstance(value, dict):
            return self.bad(path, f"{full} must be a mapping, not {type(value).__name__}")
        for key, v in value.items():
            name = key if key in fields else camel_to_snake(str(key))
            if name not in fields:
                self.bad(f"{path}.{key}", f"{full} has no field {key!r}")
                continue
            typ, repeated, scope, is_map = fields[name]
            target = typ if typ in SCALARS else self.s.resolve(typ, scope)
            where = f"{path}.{key}"
            if is_map:
                if not isinstance(v, dict):
                    self.bad(where, "a map must be a mapping")
                    continue
                for mk, mv in v.items():
                    self.value(target, mv, f"{where}[{mk}]")
            elif repeated:
                if not isinstance(v, list):
                    self.bad(where, "a repeated field must be a list")
                    continue
                for n, item in enumerate(v):
                    self.value(target, item, f"{where}[{n}]")
            else:
                self.value(target, v, where)

    def value(self, typ, v, path):
        if typ in SCALARS:
            ok = {
                "bool": isinstance(v, bool),
                "string": isinstance(v, str),
                "bytes": isinstance(v, str),
            }.get(typ, isinstance(v, (int, float)) and not isinstance(v, bool)
                  or isinstance(v, str) and re.fullmatch(r"-?\d+(\.\d+)?", v) is not None)
            if not ok:
                self.bad(path, f"expected {typ}, got {v!r}")
        elif typ in self.s.enums:
            if not (isinstance(v, str) and v in self.s.enums[typ]) and not isinstance(v, int):
                self.bad(path, f"{v!r} is not a value of {typ} ({', '.join(sorted(self.s.enums[typ]))})")
        else:
            self.message(typ, v, path)

    def well_known(self, full, kind, v, path):
        if kind == "duration":
            if not (isinstance(v, str) and re.fullmatch(r"-?\d+(\.\d+)?s", v)) and not isinstance(v, dict):
                self.bad(path, f"a Duration is written like '0.25s', not {v!r}")
        elif kind == "number":
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                self.bad(path, f"{full} must be a number, not {v!r}")
        elif kind == "bool":
            if not isinstance(v, bool):
                self.bad(path, f"{full} must be true or false, not {v!r}")
        elif kind == "string":
            if not isinstance(v, str):
                self.bad(path, f"{full} must be a string, not {v!r}")
        elif kind == "empty":
            if v not in ({}, None):
                self.bad(path, "google.protobuf.Empty must be {}")
        elif kind == "any":
            if not isinstance(v, dict) or "@type" not in v:
                return self.bad(path, 'an Any (typed_config) needs "@type"')
            url = v["@type"]
            full_name = url.rsplit("/", 1)[-1]
            rest = {k: x for k, x in v.items() if k != "@type"}
            if full_name not in self.s.messages and full_name not in WELL_KNOWN:
                return self.bad(path, f"unknown @type {url}")
            self.message(full_name, rest, f"{path}<{full_name.rsplit('.', 1)[-1]}>")


def main(argv):
    protos = None
    if len(argv) > 2 and argv[1] == "--protos":
        protos, argv = argv[2], [argv[0]] + argv[3:]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    protos = protos or find_protos()
    if not protos or not os.path.isdir(os.path.join(protos, "data-plane-api")):
        print("validate.py: Envoy's protos were not found (the envoy-types crate's copy): run "
              "`cargo fetch` in the workspace, or pass --protos DIR", file=sys.stderr)
        return 2
    schema = Schema()
    schema.load(protos)
    with open(argv[1], encoding="utf-8") as f:
        config = yaml.safe_load(f)
    checker = Checker(schema)
    checker.message("envoy.config.bootstrap.v3.Bootstrap", config, "$")
    if checker.problems:
        for p in checker.problems:
            print(f"{argv[1]}: {p}")
        return 1
    print(f"{argv[1]}: valid against Envoy's v3 API ({len(schema.messages)} message types from {protos})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
