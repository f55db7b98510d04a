"""The lineage entry point, `mlflow run . -e lineage -P model=models:/NAME/N`: a version's story both
ways, from what MLflow already holds: the data it learnt from (its train run's dataset inputs, and
the served traces they were exported from, with the versions that answered them), its train run,
its evaluations, every move of it (promotions, canaries, deliveries: the dated lines of its
description), the servers that answered with it, its traces, their exports and the train runs that
learnt from those, with the versions they registered. Each with a link into the MLflow UI."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from loraflow import registry, tracking


def job(model: str) -> None:
    """The lineage entry point (entry_points.py)."""
    uri = tracking.configure()
    story = lineage(model)
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    print(render(story, base))


def lineage(model: str) -> dict:
    client = MlflowClient()
    ref = registry.resolve(model)
    version = ref.version
    if version is None:
        version = _registered_from(client, ref.run_id)
    name, number = version.name, str(version.version)
    train = client.get_run(version.run_id)
    runs = _all_runs(client)
    adapter = registry.adapter_id(version)
    exports = [run for run in runs if run.data.tags.get(registry.JOB_TAG) == "export_traces"]
    return {
        "version": {"name": name, "version": number, "stage": version.current_stage, "aliases": list(version.aliases),
                    "experiment": train.info.experiment_id},
        "data": [_dataset(item, exports) for item in train.inputs.dataset_inputs],
        "train_run": _run(train),
        "evaluations": [_run(run) for run in runs if run.data.tags.get(registry.TRAIN_RUN_TAG) == train.info.run_id
                        and run.data.tags.get(registry.JOB_TAG) == "evaluate"],
        "moves": [line for line in (version.description or "").splitlines() if line.startswith("[")],
        "served_by": [{**_run(run), "requests": run.data.metrics.get(f"live.{adapter}.requests")} for run in runs
                      if run.data.tags.get(registry.JOB_TAG) == "serve" and f"live.{adapter}.requests" in run.data.metrics],
        "exported": [{**_run(run), "sha256": run.data.tags[registry.EXPORTED_SHA256_TAG],
                      "rows": run.data.metrics.get("rows"), "learnt_from_by": _trained_on(run, runs)}
                     for run in exports if run.data.tags.get(registry.EXPORTED_MODEL_TAG) == name
                     and int(number) in json.loads(run.data.tags.get(registry.EXPORTED_VERSIONS_TAG, "[]"))],
    }


def _all_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=5000) if experiments else []


def _registered_from(client: MlflowClient, run_id: str):
    tag = client.get_run(run_id).data.tags.get(registry.REGISTERED_VERSION_TAG)
    if not tag:
        from loraflow.errors import UserError

        raise UserError(f"Run {run_id} registered no model version: name a version (models:/NAME/N).")
    name, _, number = tag.rpartition("/")
    return client.get_model_version(name, number)


def _run(run) -> dict:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "experiment": run.info.experiment_id, "model_ref": run.data.tags.get(registry.MODEL_REF_TAG),
            "metrics": {key: value for key, value in run.data.metrics.items()
                        if key in ("exact_match", "parse_validity", "slot_f1", "bleu", "rows", "train_loss")}}


def _dataset(item, exports: list) -> dict:
    tags = {tag.key: tag.value for tag in item.tags}
    sha256 = tags.get("sha256")
    sources = [{**_run(run), "registered_model": run.data.tags.get(registry.EXPORTED_MODEL_TAG),
                "versions": json.loads(run.data.tags.get(registry.EXPORTED_VERSIONS_TAG, "[]"))}
               for run in exports if sha256 and run.data.tags.get(registry.EXPORTED_SHA256_TAG) == sha256]
    return {"name": item.dataset.name, "digest": item.dataset.digest, "sha256": sha256, "rows": tags.get("rows"),
            "context": tags.get("mlflow.data.context"), "source": item.dataset.source,
            "exported_by": sources}


def _trained_on(export, runs: list) -> list[dict]:
    """The train runs whose dataset has the export's digest, with the version each registered."""
    sha256 = export.data.tags[registry.EXPORTED_SHA256_TAG]
    return [{**_run(run), "registered": run.data.tags.get(registry.REGISTERED_VERSION_TAG)} for run in runs
            if run.data.tags.get(registry.JOB_TAG) == "train"
            and any(tag.key == "sha256" and tag.value == sha256 for item in run.inputs.dataset_inputs
                    for tag in item.tags)]


def render(story: dict, base: str) -> str:
    version = story["version"]

    def link(run: dict) -> str:
        return f"{base}/#/experiments/{run['experiment']}/runs/{run['run_id']}"

    def figures(run: dict) -> str:
        return ", ".join(f"{key} {value:g}" for key, value in sorted(run["metrics"].items()))

    lines = [f"{version['name']} v{version['version']} ({version['stage']}"
             + (f", @{', @'.join(version['aliases'])}" if version["aliases"] else "") + ")",
             f"  {base}/#/models/{version['name']}/versions/{version['version']}", "data:"]
    for item in story["data"]:
        lines.append(f"  {item['context']}: {item['name']} ({item['rows']} rows, sha256 {str(item['sha256'])[:12]}) "
                     f"from {item['source']}")
        for source in item["exported_by"]:
            answered = ", ".join(f"v{v}" for v in source["versions"])
            lines.append(f"    <- served traces of {source['registered_model']} {answered}, exported by "
                         f"{source['name']}: {link(source)}")
    train = story["train_run"]
    lines += [f"train run: {train['name']} ({train['status']}) {link(train)}", "evaluations:"]
    lines += [f"  {run['name']} ({run['status']}; {figures(run)}) {link(run)}" for run in story["evaluations"]] or ["  none"]
    lines += ["moves:"] + ([f"  {line}" for line in story["moves"]] or ["  none"])
    lines += ["served by:"] + ([f"  {run['name']} ({run['requests']:g} requests) {link(run)}"
                               for run in story["served_by"]] or ["  no server's run logged its figures"])
    lines.append("its served traces exported:")
    for export in story["exported"]:
        lines.append(f"  {export['name']} ({export['rows']:g} rows, sha256 {export['sha256'][:12]}) {link(export)}")
        lines += [f"    -> learnt from by {run['name']}, registered {run['registered'] or 'nothing'} {link(run)}"
                  for run in export["learnt_from_by"]]
    if not story["exported"]:
        lines.append("  none")
    return "\n".join(lines)
