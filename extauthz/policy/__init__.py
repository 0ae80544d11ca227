"""Policies: the YAML model, its loader and watcher, and the compiler that prepares them."""

from extauthz.policy.build import BuildContext, Services, Spec
from extauthz.policy.compiler import CompiledPolicy, PolicySet, compile_documents
from extauthz.policy.loader import PolicyLoader, PolicyWatcher, load_folder, read_documents
from extauthz.policy.model import API_VERSION, Document, PolicyError, PolicySetError, parse_documents

__all__ = [
    "API_VERSION",
    "BuildContext",
    "CompiledPolicy",
    "Document",
    "PolicyError",
    "PolicyLoader",
    "PolicySet",
    "PolicySetError",
    "PolicyWatcher",
    "Services",
    "Spec",
    "compile_documents",
    "load_folder",
    "parse_documents",
    "read_documents",
]
