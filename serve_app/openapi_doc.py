"""The reference section of docs/api.md, generated from the app's OpenAPI schema: every route with its parameters,
request body and responses, then every model with its fields. The prose around it stays hand-written.

    python -m serve_app.openapi_doc            # rewrite the section between the markers in docs/api.md
    python -m serve_app.openapi_doc --check    # exit 1 when docs/api.md is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prism_ray.config import ApiSettings
from serve_app.app import create_app

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BEGIN, END = "<!-- openapi:begin -->", "<!-- openapi:end -->"
NOTICE = "<!-- generated from the app's OpenAPI schema by `python -m serve_app.openapi_doc`: edit the app, not this -->"
REF = "#/components/schemas/"


def schema() -> dict[str, Any]:
    """The app's OpenAPI schema. Building it never calls the backend, so there is none."""
    return create_app(None, ApiSettings()).openapi()  # type: ignore[arg-type]


def render(spec: dict[str, Any]) -> str:
    models = dict(spec["components"]["schemas"])  # inline request models join these as they are met
    lines = [NOTICE, ""]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            lines += _operation(method.upper(), path, operation, spec, models)
    lines += ["### Models", ""]
    for name in sorted(models):
        lines += _model(name, models[name])
    return "\n".join(lines).rstrip() + "\n"


def update(document: str, reference: str) -> str:
    """`document` with the text between the markers replaced by `reference`."""
    head, begin, rest = document.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"docs/api.md needs the markers {BEGIN} and {END}")
    return f"{head}{BEGIN}\n{reference}{END}{tail}"


def _operation(method: str, path: str, operation: dict[str, Any], spec: dict[str, Any],
               models: dict[str, Any]) -> list[str]:
    lines = [f"#### `{method} {path}`", "", _cell(operation.get("description") or operation["summary"]), ""]
    for requirement in operation.get("security", []):
        for name in requirement:
            scheme = spec["components"]["securitySchemes"][name]
            lines += [f"Auth: {scheme.get('scheme', scheme['type'])} ({scheme.get('description', name)}).", ""]
    if operation.get("parameters"):
        lines += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{p['name']}` | {p['in']} | {_type(p['schema'], models)} | {'yes' if p.get('required') else 'no'}"
                  f" | {_cell(p.get('description', ''))} |" for p in operation["parameters"]]
        lines.append("")
    if "requestBody" in operation:
        bodies = [f"`{media}` {_type(content['schema'], models)}"
                  for media, content in operation["requestBody"]["content"].items()]
        lines += ["Request body: " + " or ".join(bodies) + ".", ""]
    lines += ["| status | body | when |", "| --- | --- | --- |"]
    for status, response in operation["responses"].items():
        content = response.get("content", {}).get("application/json")
        body = _type(content["schema"], models) if content else ""
        lines.append(f"| {status} | {body} | {_cell(response['description'])} |")
    return [*lines, ""]


def _model(name: str, model: dict[str, Any]) -> list[str]:
    lines = [f"#### {name}", ""]
    if model.get("description"):
        lines += [_cell(model["description"]), ""]
    lines += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for field, prop in model.get("properties", {}).items():
        default = f" (default `{json.dumps(prop['default'])}`)" if "default" in prop else ""
        lines.append(f"| `{field}` | {_type(prop, {})} | {'yes' if field in model.get('required', []) else 'no'} | "
                     f"{_cell(prop.get('description', ''))}{default} |")
    return [*lines, ""]


def _type(node: dict[str, Any], models: dict[str, Any]) -> str:
    """A JSON schema as a short phrase; a named inline object is linked and added to `models`."""
    if "$ref" in node:
        return _link(node["$ref"].removeprefix(REF))
    if "anyOf" in node:
        return " or ".join(_type(option, models) for option in node["anyOf"])
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return "one of " + ", ".join(f"`{value}`" for value in node["enum"])
    if node.get("type") == "object" and "properties" in node and "title" in node:
        models.setdefault(node["title"], node)
        return _link(node["title"])
    if node.get("type") == "array":
        return f"array of {_type(node['items'], models)}"
    if node.get("type") == "object":
        values = node.get("additionalProperties")
        return f"object of {_type(values, models)}" if isinstance(values, dict) else "object"
    words = [node.get("format", node.get("type", "any"))]
    if "pattern" in node:
        words.append(f"matching `{_cell(node['pattern'])}`")
    if "minLength" in node or "maxLength" in node:
        words.append(f"of {node.get('minLength', 0)}–{node.get('maxLength', '…')} characters")
    if "minimum" in node:
        words.append(f"≥ {node['minimum']}")
    return " ".join(words)


def _link(name: str) -> str:
    return f"[{name}](#{name.lower()})"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main(argv: list[str]) -> int:
    current = API_DOC.read_text()
    wanted = update(current, render(schema()))
    if argv == ["--check"]:
        if wanted != current:
            print(f"{API_DOC} is out of date with the OpenAPI schema: run `python -m serve_app.openapi_doc`")
        return int(wanted != current)
    API_DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
