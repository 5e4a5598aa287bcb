//! Bearer tokens, and the tenants they stand for. With tokens configured (`api_token`, i.e.
//! `MM_API_TOKEN`, for one tenant named `default`; `api_tokens_file` for several, a
//! `<tenant> <token>` pair per line), every call to the client API — gRPC and HTTP — needs
//! `authorization: Bearer <token>`; a session belongs to the tenant that created it, and other
//! tenants see no such session. Without tokens the API is open, as on a single-user machine.
//! Health checks, `/metrics` and the web page's static files stay open.

use std::collections::HashMap;
use std::path::Path;
use tonic::Status;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No tokens are configured: every session is everyone's.
    Anyone,
    Tenant(String),
}

impl Caller {
    /// The owner recorded on a session this caller creates.
    pub fn owner(&self) -> &str {
        match self {
            Caller::Anyone => "",
            Caller::Tenant(t) => t,
        }
    }

    /// Whether this caller may see a session owned by `owner`.
    pub fn may_see(&self, owner: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Tenant(t) => t == owner,
        }
    }

    /// The caller a request carries (put there by [`Tokens::check`]); none: the API is open.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anyone)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading api_tokens_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("api_tokens_file line {line}: expected `<tenant> <token>`")]
    Line { line: usize },
    #[error("api_tokens_file line {line}: a token needs at least 16 characters")]
    Short { line: usize },
    #[error("api_token (MM_API_TOKEN) needs at least 16 characters")]
    ShortApiToken,
}

/// The configured tokens, by token.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, String>);

/// Characters a token needs at least: a short one can be guessed.
const MIN_TOKEN_CHARS: usize = 16;

impl Tokens {
    /// `api_token` (tenant `default`) and the pairs of `api_tokens_file`; None when neither
    /// is set (the API is open).
    pub fn load(api_token: Option<&str>, file: Option<&Path>) -> Result<Option<Self>, TokensError> {
        let mut tokens = HashMap::new();
        if let Some(t) = api_token.map(str::trim).filter(|t| !t.is_empty()) {
            if t.chars().count() < MIN_TOKEN_CHARS {
                return Err(TokensError::ShortApiToken);
            }
            tokens.insert(t.to_string(), "default".to_string());
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
                path: path.display().to_string(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (Some(tenant), Some(token), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(TokensError::Line { line: i + 1 });
                };
                if token.chars().count() < MIN_TOKEN_CHARS {
                    return Err(TokensError::Short { line: i + 1 });
                }
                tokens.insert(token.to_string(), tenant.to_string());
            }
        }
        Ok((!tokens.is_empty()).then_some(Self(tokens)))
    }

    /// The tenant an `authorization` header value stands for; UNAUTHENTICATED naming what is
    /// missing otherwise. Every token is compared in full, so timing does not tell how much of
    /// a guess was right.
    pub fn check(&self, authorization: Option<&str>) -> Result<Caller, Status> {
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>` (mm reads MM_API_TOKEN)",
            ));
        };
        let Some(token) = value.strip_prefix("Bearer ") else {
            return Err(Status::unauthenticated(
                "the authorization header must be `Bearer <token>`",
            ));
        };
        let mut found = None;
        for (known, tenant) in &self.0 {
            if same(known.as_bytes(), token.as_bytes()) {
                found = Some(tenant);
            }
        }
        found
            .map(|t| Caller::Tenant(t.clone()))
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// Equal bytes, compared without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client of the orchestrator's gRPC API that sends `MM_API_TOKEN`.
pub type Client = mm_proto::orchestrator::v1::orchestrator_client::OrchestratorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Connects to the orchestrator at `addr` as the holder of `MM_API_TOKEN` (if set); an
/// `https://` address over TLS, trusting `MM_TLS_CA` when set ([`crate::tls::client_config`]).
pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())?;
    if endpoint.uri().scheme_str() == Some("https") {
        endpoint = endpoint.tls_config(crate::tls::client_config()?)?;
    }
    let channel = endpoint
        .connect()
        .await
        // tonic says "transport error"; why (refused, an unknown issuer) is its root cause.
        .map_err(|e| {
            let e = anyhow::Error::new(e);
            anyhow::anyhow!(
                "connecting to the orchestrator at {addr}: {}",
                e.root_cause()
            )
        })?;
    Ok(
        mm_proto::orchestrator::v1::orchestrator_client::OrchestratorClient::with_interceptor(
            channel,
            Bearer::from_env()?,
        ),
    )
}

/// Adds `authorization: Bearer <MM_API_TOKEN>` to each request of a client, when it is set.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// From `MM_API_TOKEN`; an error if the token cannot be a header value.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("MM_API_TOKEN") {
            Ok(t) if !t.trim().is_empty() => {
                Ok(Self(Some(format!("Bearer {}", t.trim()).parse().map_err(
                    |_| anyhow::anyhow!("MM_API_TOKEN must be printable ASCII"),
                )?)))
            }
            _ => Ok(Self(None)),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_tenants_and_the_rest_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# tenants\nalice aaaaaaaaaaaaaaaaaaaa\nbob bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let t = Tokens::load(Some("dddddddddddddddddddd"), Some(&file))
            .unwrap()
            .unwrap();
        assert_eq!(
            t.check(Some("Bearer bbbbbbbbbbbbbbbbbbbb")).unwrap(),
            Caller::Tenant("bob".into())
        );
        assert_eq!(
            t.check(Some("Bearer dddddddddddddddddddd")).unwrap(),
            Caller::Tenant("default".into())
        );
        for (header, says) in [
            (None, "missing credentials"),
            (Some("Basic abc"), "Bearer <token>"),
            (Some("Bearer bbbbbbbbbbbbbbbbbbbc"), "unknown token"),
        ] {
            let e = t.check(header).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(e.message().contains(says), "{}", e.message());
        }
        assert!(
            Tokens::load(None, None).unwrap().is_none(),
            "no tokens: open"
        );
        assert!(matches!(
            Tokens::load(Some("short"), None),
            Err(TokensError::ShortApiToken)
        ));
        std::fs::write(&file, "alice short\n").unwrap();
        assert!(matches!(
            Tokens::load(None, Some(&file)),
            Err(TokensError::Short { line: 1 })
        ));
        let bob = Caller::Tenant("bob".into());
        assert!(bob.may_see("bob") && !bob.may_see("alice") && !bob.may_see(""));
        assert!(Caller::Anyone.may_see("alice"));
    }
}
