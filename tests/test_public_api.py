"""The public surface of each package, pinned: a name added to or dropped from
an ``__all__`` fails here until this file says so too (and the docs and the
CHANGELOG-worthy note that go with it)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PUBLIC = {
    "kronlink": [
        "CheckpointError",
        "ConfigError",
        "DataFormatError",
        "KronlinkError",
        "UnsupportedModuleError",
        "__version__",
    ],
    "kronlink.cli": ["build_parser", "main"],
    "kronlink.curvature": [
        "CurvatureKind",
        "CurvatureState",
        "EKFACFactors",
        "FisherType",
        "KFACFactors",
        "LayerInfo",
        "Rule",
        "SplitFactors",
        "TaskState",
        "estimate_curvature",
    ],
    "kronlink.data": [
        "BUILDERS",
        "Candidate",
        "CandidateIndex",
        "Concept",
        "DEFAULT_MAX_BYTES",
        "Query",
        "SPLITS",
        "SplitRule",
        "Task",
        "assign_split",
        "attach_candidates",
        "build_hpo",
        "build_icd10cm",
        "build_task",
        "filter_mentions",
        "load_task",
        "read_concept_names",
        "read_medmentions",
        "read_mednorm",
        "read_ontology",
        "read_queries",
        "recall_at_k",
        "save_task",
        "split_by_concept",
        "split_by_mention",
        "split_queries",
        "train_synonyms",
        "write_ontology",
        "write_queries",
    ],
    "kronlink.data.builders": [
        "BUILDERS",
        "build_drugs",
        "build_hpo",
        "build_icd10cm",
        "build_task",
    ],
    "kronlink.data.readers": [
        "read_concept_names",
        "read_medmentions",
        "read_mednorm",
        "read_mednorm_rows",
        "read_pubtator",
    ],
    "kronlink.experiments": [
        "Choice",
        "ExperimentConfig",
        "GridRow",
        "Results",
        "Search",
        "collect_results",
        "forgetting_reduction",
        "load_config",
        "parse_config",
        "perc_delta",
        "render_report",
        "run_experiment",
        "select_data_free",
        "select_paper",
        "write_section",
    ],
    "kronlink.models": [
        "CNNRanker",
        "CNNRankerConfig",
        "MASK_FILL",
        "RANKERS",
        "Ranker",
        "RankerBatch",
        "TokenLayout",
        "TransformerRanker",
        "TransformerRankerConfig",
        "build_ranker",
        "load_ranker",
        "masked_log_softmax",
        "ranking_loss",
    ],
    "kronlink.registry": [
        "ArtifactInfo",
        "ArtifactStore",
        "AuditAction",
        "AuditEntry",
        "ConflictError",
        "DEFAULT_MAX_ATTEMPTS",
        "InvalidTransitionError",
        "JobInfo",
        "JobState",
        "LeaseLostError",
        "NotFoundError",
        "OntologyInfo",
        "RegistryError",
        "ReplicaInfo",
        "TaskInfo",
        "TaskStateInfo",
        "VersionInfo",
        "VersionState",
        "activate_version",
        "active_version",
        "add_task_state",
        "claim_job",
        "claim_next_job",
        "create_engine_from_url",
        "create_job",
        "create_ontology",
        "create_task",
        "create_version",
        "current_revision",
        "default_database_url",
        "finish_job",
        "forget_replica",
        "get_job",
        "get_ontology",
        "get_task",
        "get_version",
        "head_revision",
        "heartbeat",
        "lineage_transaction",
        "list_audit",
        "list_jobs",
        "list_ontologies",
        "list_replicas",
        "list_task_states",
        "list_tasks",
        "list_versions",
        "lock_lineage",
        "make_session_factory",
        "mark_version_failed",
        "record_audit",
        "recover_expired_jobs",
        "referenced_artifact_uris",
        "report_replica",
        "request_cancel",
        "rollback",
        "task_state_key",
        "update_progress",
        "upgrade",
        "version_key",
    ],
    "kronlink.retrieval": [
        "DenseIndex",
        "Encoder",
        "Mode",
        "Retriever",
        "encoder_version",
        "retriever_for",
        "task_retriever",
        "top1",
    ],
    "kronlink.update": [
        "HALF_DECADE_GRID",
        "PAPER_GRID",
        "PHASES",
        "SelectionRow",
        "UpdateProgress",
        "UpdateRequest",
        "UpdateResult",
        "run_update",
    ],
    "service": ["app_from_env", "create_app"],
    "service.dashboard": ["make_dashboard_app", "router"],
}
# Packages that only group modules: they export nothing themselves.
NO_SURFACE = ["service.routes", "worker"]


def _packages() -> list[str]:
    names = []
    for root in ("kronlink", "service", "worker"):
        names.append(root)
        module = importlib.import_module(root)
        for info in pkgutil.walk_packages(module.__path__, root + "."):
            if info.ispkg and not any(p.startswith("_") for p in info.name.split(".")):
                names.append(info.name)
    return names


def test_every_public_package_is_pinned() -> None:
    assert sorted(_packages()) == sorted([*PUBLIC, *NO_SURFACE])


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_is_pinned_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    assert sorted(exported) == PUBLIC[name]
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what the package lacks: {missing}"


@pytest.mark.parametrize("name", NO_SURFACE)
def test_grouping_packages_export_nothing(name: str) -> None:
    assert not hasattr(importlib.import_module(name), "__all__")
