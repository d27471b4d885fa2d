"""Networks: backbones with feature taps (fusion, FiLM, student live beside them)."""
from trifuse.nets.backbone import DynUNetBackbone, FeatureInfo, SegResNetBackbone, SegResNetDSBackbone, build_backbone

__all__ = ["DynUNetBackbone", "FeatureInfo", "SegResNetBackbone", "SegResNetDSBackbone", "build_backbone"]
