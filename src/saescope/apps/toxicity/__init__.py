"""Auditable toxicity classification from SAE features (Qwen-Scope report, section 5): rules mined from which
features fire more often on toxic than on clean text, applied as an OR over a few (layer, feature) pairs, every
positive naming the features and tokens that decided it."""

from saescope.apps.toxicity.classify import AuditLog, Decision, RuleClassifier
from saescope.apps.toxicity.evaluate import BenchConfig, benchmark, lexical_baseline, residual_probe, transfer_matrix
from saescope.apps.toxicity.rules import (
           DEFAULT_KS,
           EncodedSet,
           FeatureHits,
           Rule,
           RuleFeature,
           RuleSet,
           encode_labelled,
           make_ruleset,
           mine_rules,
           scores,
)

__all__ = ["DEFAULT_KS", "AuditLog", "BenchConfig", "Decision", "EncodedSet", "FeatureHits", "Rule", "RuleClassifier",
           "RuleFeature", "RuleSet", "benchmark", "encode_labelled", "lexical_baseline", "make_ruleset", "mine_rules",
           "residual_probe", "scores", "transfer_matrix"]
