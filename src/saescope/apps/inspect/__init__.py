"""Looking inside: feature stores (statistics, top contexts, logit lens, MoE routing), inspection of texts,
contrasts between text sets, the report's feature browser and the local web app. Steering lives in the core
(saescope.api.steer) because fine-tuning and RL steer too."""

from saescope.api.store import FeatureStore, StoreConfig, build_feature_store, expert_features, expert_profile
from saescope.apps.inspect.texts import InspectConfig, contrast, inspect_texts

__all__ = ["FeatureStore", "InspectConfig", "StoreConfig", "build_feature_store", "contrast", "expert_features",
           "expert_profile", "inspect_texts"]
