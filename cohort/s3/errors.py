"""S3 errors: one exception type and the table of standard S3 error codes.

Contract:

* ``S3Error(code, message=None, *, status=None, resource="", extra=None)``.  ``code``
  is the S3 error code string (``"NoSuchKey"``); ``status`` and ``message`` default from
  :data:`ERROR_TABLE` (unknown codes default to 500 / the code itself).  ``extra`` holds
  additional ``<Error>`` child elements S3 sends for some errors (``StringToSign``,
  ``CanonicalRequest``, ``Key``, ``BucketName``, ``Region``...), rendered in insertion
  order between ``<Message>`` and ``<Resource>``.
* ``S3Error.to_xml(request_id)`` renders the standard error document (UTF-8 bytes).
  Responses to ``HEAD`` requests and 304 must not carry it; that is the caller's job.
* ``S3Error.headers`` holds extra response headers the caller should add (e.g.
  ``x-amz-bucket-region``); empty by default.

This module is pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["ERROR_TABLE", "S3Error", "error_status", "xml_text"]

#: code -> (HTTP status, default message).  Messages follow what AWS S3 sends so that
#: SDKs and humans reading logs see familiar text.
ERROR_TABLE: Final[dict[str, tuple[int, str]]] = {
    "AccessDenied": (403, "Access Denied"),
    "AccountProblem": (
        403,
        "There is a problem with your AWS account that prevents the operation from "
        "completing successfully.",
    ),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (
        400,
        "Error parsing the X-Amz-Credential parameter.",
    ),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "BucketAlreadyExists": (
        409,
        "The requested bucket name is not available. The bucket namespace is shared by "
        "all users of the system. Please select a different name and try again.",
    ),
    "BucketAlreadyOwnedByYou": (
        409,
        "Your previous request to create the named bucket succeeded and you already own it.",
    ),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty"),
    "ConditionalRequestConflict": (
        409,
        "A conflicting conditional operation is currently in progress against this "
        "resource. Please try again.",
    ),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed object size."),
    "EntityTooSmall": (
        400,
        "Your proposed upload is smaller than the minimum allowed object size.",
    ),
    "ExpiredToken": (400, "The provided token has expired."),
    "IllegalLocationConstraintException": (
        400,
        "The unspecified location constraint is incompatible for the region specific "
        "endpoint this request was sent to.",
    ),
    "IncompleteBody": (
        400,
        "You did not provide the number of bytes specified by the Content-Length HTTP header.",
    ),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidAccessKeyId": (
        403,
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidBucketState": (409, "The request is not valid with the current state of the bucket."),
    "InvalidChunkSizeError": (
        403,
        "Only the last chunk is allowed to have a size less than 8192 bytes",
    ),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidEncryptionAlgorithmError": (
        400,
        "The encryption request you specified is not valid.",
    ),
    "InvalidLocationConstraint": (400, "The specified location constraint is not valid."),
    "InvalidObjectState": (403, "The operation is not valid for the current state of the object."),
    "InvalidPart": (
        400,
        "One or more of the specified parts could not be found.  The part may not have "
        "been uploaded, or the specified entity tag may not match the part's entity tag.",
    ),
    "InvalidPartOrder": (
        400,
        "The list of parts was not in ascending order. Parts must be ordered by part number.",
    ),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "InvalidStorageClass": (400, "The storage class you specified is not valid"),
    "InvalidToken": (400, "The provided token is malformed or otherwise invalid."),
    "InvalidURI": (400, "Couldn't parse the specified URI."),
    "KeyTooLongError": (400, "Your key is too long"),
    "MalformedXML": (
        400,
        "The XML you provided was not well-formed or did not validate against our published schema",
    ),
    "MaxMessageLengthExceeded": (400, "Your request was too big."),
    "MetadataTooLarge": (
        400,
        "Your metadata headers exceed the maximum allowed metadata size.",
    ),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "MissingRequestBodyError": (400, "Request Body is empty"),
    "MissingSecurityHeader": (400, "Your request is missing a required header."),
    "NoSuchBucket": (404, "The specified bucket does not exist"),
    "NoSuchBucketPolicy": (404, "The bucket policy does not exist"),
    "NoSuchCORSConfiguration": (404, "The CORS configuration does not exist"),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchLifecycleConfiguration": (404, "The lifecycle configuration does not exist."),
    "NoSuchTagSet": (404, "The TagSet does not exist"),
    "NoSuchUpload": (
        404,
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
    ),
    "NoSuchVersion": (
        404,
        "The version ID specified in the request does not match an existing version.",
    ),
    "NotImplemented": (
        501,
        "A header you provided implies functionality that is not implemented.",
    ),
    "NotModified": (304, "Not Modified"),
    "OperationAborted": (
        409,
        "A conflicting conditional operation is currently in progress against this "
        "resource. Try again.",
    ),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold"),
    "RequestHeaderSectionTooLarge": (
        400,
        "Your request header section exceeds the maximum allowed size.",
    ),
    "RequestTimeTooSkewed": (
        403,
        "The difference between the request time and the current time is too large.",
    ),
    "RequestTimeout": (
        400,
        "Your socket connection to the server was not read from or written to within "
        "the timeout period.",
    ),
    "ServiceUnavailable": (503, "Please reduce your request rate."),
    "SignatureDoesNotMatch": (
        403,
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    ),
    "SlowDown": (503, "Please reduce your request rate."),
    "TooManyBuckets": (400, "You have attempted to create more buckets than allowed"),
    "UnexpectedContent": (400, "This request does not support content"),
    "XAmzContentSHA256Mismatch": (
        400,
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    ),
}


def error_status(code: str) -> int:
    """HTTP status for ``code`` (500 for codes not in the table)."""
    entry = ERROR_TABLE.get(code)
    return entry[0] if entry is not None else 500


_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
_NEEDS_WORK = re.compile("[&<>\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(value: str) -> str:
    """Escape ``value`` for XML character data (invalid XML 1.0 chars -> U+FFFD)."""
    # XML 1.0 cannot carry most C0 controls even escaped; S3 keys may contain them, so
    # replace rather than produce a document clients cannot parse.  (Hot path of every
    # listing: one regex search decides, almost always "nothing to do".)
    if _NEEDS_WORK.search(value) is None:
        return value
    if _INVALID_XML.search(value) is not None:
        value = _INVALID_XML.sub("\ufffd", value)
    return value.translate(_XML_ESCAPES)


class S3Error(Exception):
    """An S3 error response.  See the module docstring for the contract."""

    code: str
    message: str
    status: int
    resource: str
    extra: dict[str, str]
    headers: dict[str, str]

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        resource: str = "",
        extra: dict[str, str] | None = None,
    ) -> None:
        default_status, default_message = ERROR_TABLE.get(code, (500, code))
        self.code = code
        self.message = message if message is not None else default_message
        self.status = status if status is not None else default_status
        self.resource = resource
        self.extra = dict(extra) if extra else {}
        self.headers = {}
        super().__init__(f"{code}: {self.message}")

    def __repr__(self) -> str:
        return f"S3Error({self.code!r}, {self.message!r}, status={self.status})"

    def to_xml(self, request_id: str) -> bytes:
        """The ``<Error>`` document S3 sends, as UTF-8 bytes."""
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>',
            xml_text(self.code),
            "</Code><Message>",
            xml_text(self.message),
            "</Message>",
        ]
        for name, value in self.extra.items():
            parts.append(f"<{name}>{xml_text(value)}</{name}>")
        if self.resource:
            parts.append(f"<Resource>{xml_text(self.resource)}</Resource>")
        parts.append(f"<RequestId>{xml_text(request_id)}</RequestId>")
        parts.append(f"<HostId>{xml_text(request_id)}</HostId></Error>")
        return "".join(parts).encode("utf-8")
