//! S3 (and S3-compatible) object stores, configured from the standard AWS variables.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

use super::SourceError;

/// Connection settings of S3 buckets. [`S3Config::from_env`] reads the standard AWS
/// variables; tests and embedders fill it directly. `Debug` hides the secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; `us-east-1` when unset.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`): an S3-compatible server. Plain
    /// `http://` endpoints are allowed.
    pub endpoint: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// `AWS_SKIP_SIGNATURE=true`: send unsigned requests (public buckets), no credentials.
    pub skip_signature: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("skip_signature", &self.skip_signature)
            .finish()
    }
}

impl S3Config {
    /// Reads the standard AWS environment variables.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`S3Config::from_env`], reading variables through `lookup`; empty values count
    /// as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let first = |keys: &[&str]| keys.iter().find_map(|k| get(k));
        S3Config {
            region: first(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            endpoint: first(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            access_key_id: get("AWS_ACCESS_KEY_ID"),
            secret_access_key: get("AWS_SECRET_ACCESS_KEY"),
            session_token: get("AWS_SESSION_TOKEN"),
            skip_signature: get("AWS_SKIP_SIGNATURE")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes")),
        }
    }

    /// A store for `bucket`. Without credentials (and without `skip_signature`) this fails
    /// rather than letting object_store ask the EC2 metadata service.
    pub fn build(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, SourceError> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(self.region.as_deref().unwrap_or("us-east-1"));
        if let Some(endpoint) = &self.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if self.skip_signature {
            b = b.with_skip_signature(true);
        } else {
            match (&self.access_key_id, &self.secret_access_key) {
                (Some(id), Some(secret)) => {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(token) = &self.session_token {
                        b = b.with_token(token);
                    }
                }
                (Some(_), None) => {
                    return Err(SourceError::Credentials {
                        bucket: bucket.to_string(),
                        message: "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
                    });
                }
                _ => {
                    return Err(SourceError::Credentials {
                        bucket: bucket.to_string(),
                        message: "no AWS credentials: set AWS_ACCESS_KEY_ID and \
                                  AWS_SECRET_ACCESS_KEY (or AWS_SKIP_SIGNATURE=true for a public bucket)"
                            .into(),
                    });
                }
            }
        }
        let store = b.build().map_err(|source| SourceError::ObjectStore {
            location: format!("s3://{bucket}"),
            source,
        })?;
        Ok(Arc::new(store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_standard_variables_and_hides_secrets() {
        let env = [
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
            ("AWS_SESSION_TOKEN", "t0k3n"),
        ];
        let c = S3Config::from_lookup(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(!c.skip_signature);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t") && !dbg.contains("t0k3n"), "{dbg}");
        assert!(c.build("b").is_ok());
    }

    #[test]
    fn no_credentials_is_a_clear_error_unless_unsigned() {
        let c = S3Config::from_lookup(|_| None);
        let err = c.build("data").unwrap_err().to_string();
        assert!(
            err.contains("s3://data") && err.contains("AWS_ACCESS_KEY_ID"),
            "{err}"
        );
        let c = S3Config {
            skip_signature: true,
            ..S3Config::default()
        };
        assert!(c.build("data").is_ok());
    }
}
