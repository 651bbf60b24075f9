//! Run results to typed Arrow record batches; JSON Schema to Arrow schema.
