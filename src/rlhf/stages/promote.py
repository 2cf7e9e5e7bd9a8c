"""Promotion: register the run's three models, and move `@champion` only through the gate.

The gate (computed by eval, re-checked here from eval's result) passes when every threshold in `cfg.gate`
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

from rlhf.adapters.registry import CHAMPION, KINDS, Registry, RegistryError, Version, model_name
from rlhf.stages.challenge import CHAMPION_WAIT_S, champion_lease, rechallenge
from rlhf.stages.contract import StageContext, StageResult
from rlhf.stages.gate import gate_decision
from rlhf.stages.table import STAGE_OF_KIND as STAGE_OF
from rlhf.train.progress import Timer

RUN_TAG = "rlhf.run"
PREVIOUS_CHAMPION = "promote/previous_champion.json"


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


def lineage(ctx: StageContext) -> dict[str, str]:
    """Tags that tie a version to its pipeline run (when it runs inside one)."""
    if not ctx.store.exists("pipeline.json"):
        return {}
    pipeline = ctx.store.read_json("pipeline.json")
    return {"rlhf.parent_run_id": ctx.parent_run_id or "", "rlhf.kfp_run_id": pipeline["kfp_run_id"],
            "rlhf.data_key": pipeline["data_key"], "rlhf.git_sha": pipeline["git_sha"]}


def move_alias(reg: Registry, policy: Version, passed: bool, reasons: list[str], evaluation: dict,
               ctx: StageContext) -> tuple[bool, str | None]:
    """Move `@champion` to the policy when asked and the gate passed (recording the
    previous champion first); tag the version either way. Returns whether it passed, and
    what happened in a lost race (None: there was none).

    A compare-and-swap: under the champion lease, the alias moves only if it is still on
    the version eval compared against. If another run moved it meanwhile (a lost race),
    this policy is compared again with the new champion (`rechallenge`) and the gate
    decided again; the reasons say so either way."""
    promote, note = ctx.options.get("move_alias", True), None
    if promote and passed:
        ctx.faults.barrier()  # race tests: both runs evaluated before either moves the alias
        with champion_lease(ctx, policy.name).held(CHAMPION_WAIT_S):
            current = reg.by_alias(policy.name, CHAMPION)
            compared = evaluation.get("champion/version")
            if current is not None and current.version not in (policy.version, compared):
                again = rechallenge(ctx)
                passed, reasons[:] = gate_decision({**evaluation, **again}, ctx.config)
                note = (f"the champion moved to version {current.version} after eval compared against "
                        f"{compared or 'none'} (another run promoted meanwhile); compared again with version "
                        f"{current.version}: {'better, promoted' if passed else 'not better, not promoted'}")
                print(f"promote: {note}", flush=True)
                if not passed:
                    reasons.insert(0, note)
                reg.set_tags(policy, {"rlhf.champion_race": note[:5000]})
            if passed and (current is None or current.version != policy.version):
                # what to restore if anything after this fails (the exit handler reads it)
                ctx.store.write_json(PREVIOUS_CHAMPION, {"name": policy.name,
                                                         "version": current.version if current else None})
                reg.set_alias(policy, CHAMPION)
                ctx.faults.after_step(2, "promote")  # crash tests: killed right after moving the alias
    if promote and passed:
        reg.set_tags(policy, {"rlhf.gate": "passed"})
        return True, note
    reasons[:] = reasons or ["the pipeline's gate did not pass"]
    reg.set_tags(policy, {"rlhf.gate": "failed", "rlhf.gate_reasons": "; ".join(reasons)[:5000]})
    return False, note


def run(ctx: StageContext) -> StageResult:
    timer, store, base = Timer(), ctx.store, ctx.registered_model
    if not ctx.tracker.tracking_uri:
        raise RegistryError("promotion needs an MLflow tracking store (the registry); it is off in this run")
    if store.exists("promote/result.json"):  # done before: re-running changes nothing
        return StageResult(store.read_json("promote/result.json"))
    with ctx.tracker.stage_run(ctx.name, {"promote": ctx.options.get("move_alias", True), "registered_model": base},
                               store=store):
        # 1. inputs: eval's result (with its gate) and each stage's logged model
        evaluation = store.read_json("eval/result.json")
        results = {s: store.read_json(f"{s}/result.json") for s in STAGE_OF.values()}
        passed, reasons = gate_decision(evaluation, ctx.config)

        # 2. register (idempotent, all or nothing)
        reg = Registry(ctx.tracker.tracking_uri)
        versions = _register_all(reg, base, store, results, lineage(ctx))
        policy = versions["policy"]
        ctx.faults.after_step(1, "promote")  # crash tests: killed between registering and the alias

        # 3. gate and alias
        passed, race = move_alias(reg, policy, passed, reasons, evaluation, ctx)
        champion = reg.by_alias(policy.name, CHAMPION)
        promoted = champion is not None and champion.version == policy.version
        ctx.tracker.log_dict({"versions": {k: v.version for k, v in versions.items()}, "promoted": promoted,
                              "reasons": reasons}, "promotion.json")

    # 4. results (the dispatcher adds them to the run's summary)
    return StageResult({
        "wall_s": timer(), "promoted": promoted, "registered_model": policy.name,
        "policy_model_uri": f"models:/{policy.name}@{CHAMPION}" if promoted else policy.uri,
        "policy_version_uri": policy.uri,
        "registered_versions": {model_name(base, k): v.version for k, v in versions.items()},
        "champion_version": champion.version if champion else None, "gate_passed": passed, "gate_reasons": reasons,
        "champion_race": race,
        "mlflow_run_id": ctx.tracker.run_id})
