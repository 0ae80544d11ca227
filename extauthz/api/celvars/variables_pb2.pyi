from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("method", "host", "path", "raw_path", "query", "query_all", "headers", "body", "raw_body", "id", "scheme", "protocol", "size", "partial_body", "fragment", "operation")
    class QueryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class QueryAllEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.ListValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.ListValue, _Mapping]] = ...) -> None: ...
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RAW_PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERY_ALL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    RAW_BODY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BODY_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    raw_path: str
    query: _containers.ScalarMap[str, str]
    query_all: _containers.MessageMap[str, _struct_pb2.ListValue]
    headers: _containers.ScalarMap[str, str]
    body: str
    raw_body: bytes
    id: str
    scheme: str
    protocol: str
    size: int
    partial_body: bool
    fragment: str
    operation: Operation
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., raw_path: _Optional[str] = ..., query: _Optional[_Mapping[str, str]] = ..., query_all: _Optional[_Mapping[str, _struct_pb2.ListValue]] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[str] = ..., raw_body: _Optional[bytes] = ..., id: _Optional[str] = ..., scheme: _Optional[str] = ..., protocol: _Optional[str] = ..., size: _Optional[int] = ..., partial_body: _Optional[bool] = ..., fragment: _Optional[str] = ..., operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("id", "label", "method", "path", "params", "query", "deprecated", "tags")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DEPRECATED_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    method: str
    path: str
    params: _struct_pb2.Struct
    query: _struct_pb2.Struct
    deprecated: bool
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., query: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., deprecated: _Optional[bool] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("address", "port", "principal", "certificate", "service", "labels", "client_ip")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    principal: str
    certificate: str
    service: str
    labels: _containers.ScalarMap[str, str]
    client_ip: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., principal: _Optional[str] = ..., certificate: _Optional[str] = ..., service: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., client_ip: _Optional[str] = ...) -> None: ...

class Destination(_message.Message):
    __slots__ = ("address", "port", "principal", "certificate", "service", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    principal: str
    certificate: str
    service: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., principal: _Optional[str] = ..., certificate: _Optional[str] = ..., service: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Tls(_message.Message):
    __slots__ = ("sni", "version")
    SNI_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    sni: str
    version: str
    def __init__(self, sni: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Spiffe(_message.Message):
    __slots__ = ("trust_domain", "path", "namespace", "service_account")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    path: str
    namespace: str
    service_account: str
    def __init__(self, trust_domain: _Optional[str] = ..., path: _Optional[str] = ..., namespace: _Optional[str] = ..., service_account: _Optional[str] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("kind", "source", "subject", "claims", "scopes", "principal", "spiffe", "issuer", "token_id", "certificate_bound", "client_id", "key_id", "owner", "key_owner", "user", "groups")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_BOUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KEY_OWNER_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    source: str
    subject: str
    claims: _struct_pb2.Struct
    scopes: _containers.RepeatedScalarFieldContainer[str]
    principal: str
    spiffe: Spiffe
    issuer: str
    token_id: str
    certificate_bound: bool
    client_id: str
    key_id: str
    owner: str
    key_owner: str
    user: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., source: _Optional[str] = ..., subject: _Optional[str] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., scopes: _Optional[_Iterable[str]] = ..., principal: _Optional[str] = ..., spiffe: _Optional[_Union[Spiffe, _Mapping]] = ..., issuer: _Optional[str] = ..., token_id: _Optional[str] = ..., certificate_bound: _Optional[bool] = ..., client_id: _Optional[str] = ..., key_id: _Optional[str] = ..., owner: _Optional[str] = ..., key_owner: _Optional[str] = ..., user: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...
