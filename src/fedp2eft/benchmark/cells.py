"""One client's cells, computed in a worker: its validation rows over the learning-rate grid, and its
personalized results of every method and budget (also ``fedp2eft personalize --run``'s one cell)."""

from __future__ import annotations

import time

from fedp2eft.benchmark.workers import worker_artifacts, worker_model
from fedp2eft.core.methods import ClientContext, PersonalizeConfig, Personalized, evaluate_many, method_lr, \
    method_spec, personalize, personalize_config, personalize_many
from fedp2eft.core.personalization import validation_split
from fedp2eft.core.pfl import apply_overlay

def _scores(metrics: dict) -> dict:
    """The task's main metric as (correct, count), what selection and the report pool over clients (a sum of
    ROUGE-L scores for generations, so not always an integer), and every metric as [sum, count] under ``scores``."""
    scores = metrics["scores"]
    main, (total, count) = next(iter(scores.items()))
    return {"metric": main, "correct": total, "count": count, "score": total / count,
            "scores": {name: list(pair) for name, pair in scores.items()}}


def validate_client(config: dict, index: int, methods: list[str], artifacts: dict[str, str]) -> dict:
    """Every method x budget x learning-rate scale of the grid, trained on the inner split of one client's
    training data and scored on its validation split (that client's test data are never touched)."""
    setup, base = worker_model()
    section = config["selection"]
    client = setup.data.pool(section["pool"])[index]
    inner, held_out = validation_split(client.train, section["validation_fraction"], client.client_id)
    context = ClientContext(base, setup.task, inner, worker_artifacts(artifacts))
    personal = seeded_personalize_config(config, config["seeds"][0])
    grid = [(method, scale, budget) for method in methods for scale in section["grid"] for budget in config["budgets"]]
    with apply_overlay(base, setup.personal_overlay(base, section["pool"], index)):
        results = personalize_many(context, [(m, b, personal.with_lr_scale(s)) for m, s, b in grid])
        scores = evaluate_many(setup.task, results, held_out)
    rows = [{"method": method, "budget": budget, "scale": scale, **_scores(score)}
            for (method, scale, budget), score in zip(grid, scores)]
    return {"client": client.client_id, "language": client.language, "methods": methods, "rows": rows}


def personalize_client(config: dict, seed: int, pool: str, index: int, scales: dict[str, dict[int, float]],
                       artifacts: dict[str, str]) -> dict:
    """Every method x budget for one client (in a worker process), each at its selected learning-rate scale;
    also the un-personalized base model. The client's features, generator output and BayesTune search are
    computed once for all budgets. Rows carry what each method declares it reports (ranks, lambdas, ...). On a
    personalized-FL base everything, the base row included, starts from the client's own personal base."""
    setup, base = worker_model()
    client = setup.data.pool(pool)[index]
    personal = seeded_personalize_config(config, seed)
    context = ClientContext(base, setup.task, client.train, worker_artifacts(artifacts))
    cells = [(method, budget, scales[method][budget]) for method in config["methods"] for budget in config["budgets"]]
    with apply_overlay(base, setup.personal_overlay(base, pool, index)):
        start = time.perf_counter()
        rows = [{"method": "base", "budget": 0, **_scores(setup.task.evaluate(base, client.test)),
                 "seconds": time.perf_counter() - start}]
        start = time.perf_counter()
        results = personalize_many(context, [(m, b, personal.with_lr_scale(s)) for m, b, s in cells])
        scores = evaluate_many(setup.task, results, client.test)
        seconds = (time.perf_counter() - start) / len(cells)  # cells trained together share their pass's time
    rows += [cell_row(method, budget, personal.with_lr_scale(scale), scale, result, score, seconds)
             for (method, budget, scale), result, score in zip(cells, results, scores)]
    return {"seed": seed, "pool": pool, "client": client.client_id, "language": client.language, "rows": rows}


def seeded_personalize_config(config: dict, seed: int) -> PersonalizeConfig:
    """The personalization settings of a run's ``seed`` (before its learning-rate scale is applied)."""
    return personalize_config({**config["personalize"], "seed": seed})


def personalize_cell(context: ClientContext, test: list[dict], method: str, budget: int, personal: PersonalizeConfig,
                     lr_scale: float) -> tuple[dict, Personalized]:
    """One cell of the results for one client: ``method`` at ``budget`` with every learning rate times
    ``lr_scale``, scored on the client's test data. Returns the row ``personalize.jsonl`` keeps (with what the method
    reports) and the personalized model; the benchmark and ``fedp2eft personalize --run`` both compute cells here,
    so the command reproduces the run's rows."""
    start = time.perf_counter()
    tuned = personal.with_lr_scale(lr_scale)
    result = personalize(method, context, budget=budget, config=tuned)
    score = context.task.evaluate(result.model, test)
    return cell_row(method, budget, tuned, lr_scale, result, score, time.perf_counter() - start), result


def cell_row(method: str, budget: int, tuned: PersonalizeConfig, lr_scale: float, result: Personalized, score: dict,
             seconds: float) -> dict:
    """The row ``personalize.jsonl`` keeps for one cell, with what its method declares it reports."""
    row = {"method": method, "budget": budget, **_scores(score), "seconds": seconds, "lr_scale": lr_scale,
           "lr": method_lr(tuned, method, budget), "train_loss_last_epoch": result.metrics["train_loss_last_epoch"]}
    for field in method_spec(method).reports:
        row[field] = result.ranks if field == "ranks" else result.report[field]
    return row
