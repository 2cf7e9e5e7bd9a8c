"""Promotion: register the run's three models, and move `@champion` only through the gate.

The gate (computed by eval, re-read here) passes when every threshold in `cfg.gate`
holds AND the policy beats the current champion on the same held-out prompts. The
pipeline calls this stage on both sides of its `dsl.If`: with `promote=True` when the
gate passed, with `promote=False` otherwise, so a rejected version is still
registered, tagged with the reasons, and the alias stays where it was.

All or nothing: a failure while registering deletes the versions this call created;
the alias moves last, after the previous champion is recorded in the store, so the
exit handler can put it back if anything later fails. Idempotent: a completed promote
returns its recorded result; a partial one finds its versions again by the run's tag.

Steps: 1. inputs  2. register (or find) sft/reward/policy  3. gate, alias  4. results
"""

from __future__ import annotations

from rlhf.config import GateConfig, PipelineConfig
from rlhf.adapters.settings import maybe_inject_fault
from rlhf.adapters.registry import CHAMPION, KINDS, Registry, RegistryError, Version, model_name
from rlhf.stages.common import Timer, write_result

RUN_TAG = "rlhf.run"
PREVIOUS_CHAMPION = "promote/previous_champion.json"
STAGE_OF = {"sft": "sft", "reward": "reward", "policy": "ppo"}


def gate_decision(summary: dict, g: GateConfig) -> tuple[bool, list[str]]:
    """(passed, reasons it failed). Pure: thresholds from the config, numbers from eval."""
    reasons = []
    win = summary.get("eval/win_rate_vs_sft")
    if win is None or win < g.min_win_rate:
        reasons.append(f"win rate vs SFT {win} is below gate.min_win_rate={g.min_win_rate}")
    delta = summary.get("eval/gold_delta")
    if delta is not None and delta < g.min_gold_delta:
        reasons.append(f"gold delta {delta:.4f} is below gate.min_gold_delta={g.min_gold_delta}")
    kl = summary.get("eval/kl_vs_sft")
    if kl is not None and kl > g.max_kl:
        reasons.append(f"KL vs SFT {kl:.3f} is above gate.max_kl={g.max_kl}")
    tax = summary.get("eval/alignment_tax")
    if tax is not None and tax > g.max_alignment_tax:
        reasons.append(f"alignment tax {tax:.4f} is above gate.max_alignment_tax={g.max_alignment_tax}")
    if summary.get("champion/version"):
        cw = summary.get("champion/win_rate")
        if cw is None or cw <= 0.5 + g.champion_margin:
            reasons.append(f"does not beat champion version {summary['champion/version']}: win rate {cw} "
                           f"is not above {0.5 + g.champion_margin} (0.5 + gate.champion_margin)")
    return not reasons, reasons


def _register_all(reg: Registry, base: str, store, results: dict, lineage: dict[str, str]) -> dict[str, Version]:
    """Register sft, reward, policy (or find the ones an earlier attempt registered)."""
    run_uri = store.uri("")
    found = {k: reg.find(model_name(base, k), RUN_TAG, run_uri) for k in KINDS}
    if all(found.values()):
        return {k: v[-1] for k, v in found.items()}
    created: list[Version] = []
    try:
        for vs in found.values():  # a partial earlier attempt: start clean
            for v in vs:
                reg.delete(v)
        out: dict[str, Version] = {}
        for kind in KINDS:
            res = results[STAGE_OF[kind]]
            if not res.get("model_uri"):
                raise RegistryError(f"the {STAGE_OF[kind]} stage logged no model (tracking.log_models is off?); "
                                    "nothing to register")
            tags = {RUN_TAG: run_uri, "rlhf.kind": kind, "rlhf.stage_run_id": res.get("mlflow_run_id") or "",
                    "rlhf.artifact": store.uri(f"{STAGE_OF[kind]}/model"), **lineage}
            if kind == "policy":
                tags.update({"rlhf.sft_version": out["sft"].version, "rlhf.reward_version": out["reward"].version,
                             "rlhf.reward_model_uri": out["reward"].uri})
            v = reg.register(model_name(base, kind), res["model_uri"], res.get("mlflow_run_id"), tags,
                             description=f"{kind} model from {run_uri}")
            created.append(v)
            out[kind] = v
        return out
    except BaseException:
        for v in created:
            try:
                reg.delete(v)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
        raise


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False, promote: bool = True,
        lineage: dict[str, str] | None = None) -> dict:
    timer = Timer()
    if not getattr(tracker, "tracking_uri", None):
        raise RegistryError("promotion needs an MLflow tracking store (the registry); it is off in this run")
    base = cfg.tracking.registered_model
    if store.exists("promote/result.json"):  # done before: re-running changes nothing
        return store.read_json("promote/result.json")
    with tracker.stage_run("promote", {"promote": promote, "registered_model": base}, store=store):
        # 1. inputs: eval's summary (with its gate) and each stage's logged model
        summary = store.read_json("summary.json")
        results = {s: store.read_json(f"{s}/result.json") for s in ("sft", "reward", "ppo")}
        passed, reasons = gate_decision(summary, cfg.gate)

        # 2. register (idempotent, all or nothing)
        reg = Registry(tracker.tracking_uri)
        versions = _register_all(reg, base, store, results, dict(lineage or {}))
        policy = versions["policy"]
        maybe_inject_fault(1, "promote")  # crash tests: killed between registering and the alias

        # 3. gate and alias
        current = reg.by_alias(policy.name, CHAMPION)
        compared = summary.get("champion/version")
        if promote and passed and current is not None and current.version not in (policy.version, compared):
            passed = False
            reasons.append(f"the champion moved to version {current.version} after this run compared against "
                           f"{compared or 'none'}; rerun the pipeline to compare against the new champion")
        if promote and passed:
            if current is None or current.version != policy.version:
                # what to restore if anything after this fails (the exit handler reads it)
                store.write_json(PREVIOUS_CHAMPION, {"name": policy.name,
                                                     "version": current.version if current else None})
                reg.set_alias(policy, CHAMPION)
                maybe_inject_fault(2, "promote")  # crash tests: killed right after moving the alias
            reg.set_tags(policy, {"rlhf.gate": "passed"})
        else:
            reasons = reasons or ["the pipeline's gate did not pass"]
            reg.set_tags(policy, {"rlhf.gate": "failed", "rlhf.gate_reasons": "; ".join(reasons)[:5000]})
        champion = reg.by_alias(policy.name, CHAMPION)
        promoted = champion is not None and champion.version == policy.version
        tracker.log_dict({"versions": {k: v.version for k, v in versions.items()}, "promoted": promoted,
                          "reasons": reasons}, "promotion.json")

    # 4. results: the run summary gains the registry outcome
    result = {"wall_s": timer(), "promoted": promoted, "registered_model": policy.name,
              "policy_model_uri": f"models:/{policy.name}@{CHAMPION}" if promoted else policy.uri,
              "policy_version_uri": policy.uri,
              "registered_versions": {model_name(base, k): v.version for k, v in versions.items()},
              "champion_version": champion.version if champion else None,
              "gate_passed": passed, "gate_reasons": reasons, "mlflow_run_id": tracker.run_id}
    write_result(store, "promote", result)
    summary.update({k: v for k, v in result.items() if k not in ("wall_s", "mlflow_run_id")})
    summary.setdefault("wall_s", {})["promote"] = round(result["wall_s"], 2)
    summary["wall_s"]["total"] = round(sum(v for k, v in summary["wall_s"].items() if k != "total"), 2)
    store.write_json("summary.json", summary)
    return result
