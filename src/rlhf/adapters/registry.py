"""MLflow Model Registry: registered versions, the `@champion` alias, pulling models.

Names: `<base>-sft`, `<base>-reward`, `<base>-policy`. Promotion moves the alias
`champion` on `<base>-policy` (aliases, not the deprecated stages). Every version
carries lineage tags (`rlhf.*`: pipeline run, stage run, data hash, config
fingerprint, git sha, and the sft/reward versions it came from).

Note: `search_model_versions` returns versions with empty `aliases` (MLflow bug), so
aliases are always read through `get_registered_model` / `get_model_version_by_alias`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf.redaction import redact

CHAMPION = "champion"
KINDS = ("sft", "reward", "policy")


class RegistryError(RuntimeError):
    pass


def model_name(base: str, kind: str) -> str:
    return f"{base}-{kind}"


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class Registry:
    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        from rlhf.adapters.tracking import ready_store

        self.tracking_uri = ready_store(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @staticmethod
    def _version(mv) -> Version:
        return Version(mv.name, str(mv.version), mv.source, mv.run_id, dict(mv.tags or {}))

    def _missing(self, e: Exception) -> bool:
        return "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower()

    def by_alias(self, name: str, alias: str = CHAMPION) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as e:
            if self._missing(e):
                return None
            raise

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of one registered model ({} when the model does not exist)."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(name)
        except MlflowException as e:
            if self._missing(e):
                return {}
            raise
        return {a: str(v) for a, v in (rm.aliases or {}).items()}

    def find(self, name: str, tag: str, value: str) -> list[Version]:
        """Versions of `name` whose tag `tag` equals `value`, oldest first."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
        except MlflowException as e:
            if self._missing(e):
                return []
            raise
        return sorted((self._version(v) for v in found), key=lambda v: int(v.version))

    def register(self, name: str, model_uri: str, run_id: str | None, tags: dict[str, str],
                 description: str = "") -> Version:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as e:
            if not self._missing(e):
                raise
            try:
                self.client.create_registered_model(name, description=f"RLHF pipeline: {name.rsplit('-', 1)[-1]} models")
            except MlflowException:
                pass  # created concurrently
        source, model_id = model_uri, None
        if model_uri.startswith("models:/m-"):  # an MLflow 3 logged model: register its artifacts
            model_id = model_uri[len("models:/"):]
            source = self.client.get_logged_model(model_id).artifact_location
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                              description=description, model_id=model_id)
        return self._version(mv)

    def set_tags(self, v: Version, tags: dict[str, str]) -> None:
        for k, val in tags.items():
            self.client.set_model_version_tag(v.name, v.version, k, redact(val))

    def set_alias(self, v: Version, alias: str = CHAMPION) -> None:
        self.client.set_registered_model_alias(v.name, alias, v.version)

    def delete(self, v: Version) -> None:
        self.client.delete_model_version(v.name, v.version)

    def list_models(self, prefix: str = "") -> list[dict]:
        out = []
        for rm in self.client.search_registered_models(max_results=1000):
            if prefix and not rm.name.startswith(prefix):
                continue
            latest = self.client.search_model_versions(f"name = '{rm.name}'", max_results=1000)
            out.append({"name": rm.name, "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
                        "versions": len(latest),
                        "latest_version": max((int(v.version) for v in latest), default=None)})
        return sorted(out, key=lambda r: r["name"])


def parse_model_ref(ref: str) -> str:
    """`NAME@ALIAS`, `NAME/VERSION` or a full `models:/...` URI -> a models:/ URI."""
    if ref.startswith("models:/"):
        return ref
    if "@" in ref or "/" in ref:
        return f"models:/{ref}"
    raise RegistryError(f"{ref!r}: name a version as NAME@ALIAS (e.g. rlhf-demo-policy@champion) or NAME/VERSION")


def pull(tracking_uri: str, ref: str, dest: Path) -> Path:
    """Download a registered model and write it as a plain Hugging Face folder
    (safetensors + tokenizer) that `from_pretrained(dest)` loads without MLflow."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from rlhf.adapters.tracking import ready_store

    mlflow.set_tracking_uri(ready_store(tracking_uri))
    uri = parse_model_ref(ref)
    try:
        parts = mlflow.transformers.load_model(uri, return_type="components")
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message if hasattr(e, 'message') else e}; `rlhf models list` shows "
                            "what is registered") from None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts["model"].save_pretrained(dest, safe_serialization=True)
    parts["tokenizer"].save_pretrained(dest)
    return dest
