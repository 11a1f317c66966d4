"""Pure (sans-I/O) S3 protocol layer.

Nothing in this package performs I/O or imports aiohttp: every function takes plain
values (strings, bytes, mappings) and returns plain values or raises
:class:`cohort.s3.errors.S3Error`.  The director (the HTTP front) adapts requests to
these functions and renders the results.

Modules:

* :mod:`cohort.s3.errors`    -- ``S3Error`` and the table of S3 error codes.
* :mod:`cohort.s3.sigv4`     -- AWS Signature V4 verification (header + presigned) and
  client-side signing.
* :mod:`cohort.s3.chunked`   -- incremental ``aws-chunked`` body decoder (and encoder).
* :mod:`cohort.s3.checksums` -- CRC32/CRC32C/CRC64NVME/SHA1/SHA256/MD5 hashing and
  request checksum negotiation.
* :mod:`cohort.s3.xmlio`     -- request-body XML parsing and response XML rendering.
* :mod:`cohort.s3.names`     -- bucket/key validation, Range and conditional headers,
  HTTP dates.
"""
