//! Mutual authentication with a shared secret: one challenge-response for every backend.
//!
//! A pure state machine (no I/O, no clock, nonces passed in); each backend carries its two
//! messages, [`Hello`] and a proof, in its own frames (`tcp::codec`, `rdma::wire`).
//!
//! ```text
//! client                                          server
//!   Hello { endpoint_c, nonce_c, has_secret } ──►
//!                                             ◄── Hello { endpoint_s, nonce_s, has_secret }
//!   proof_c ──────────────────────────────────►   verified before anything else happens;
//!                                                 nothing derived from the secret was sent yet
//!                                             ◄── proof_s
//!   verified
//!
//! proof_role = HMAC-SHA256(secret, "genie-auth-v1 " ‖ role ‖ nonce_c ‖ nonce_s ‖ endpoint_c ‖ endpoint_s)
//! ```
//!
//! - **Role-bound**: the client's and the server's proofs use different labels, so a proof can
//!   never be replayed in the other direction (the reflection attack: a client echoing the
//!   server's own nonce and endpoint id and reflecting its proof).
//! - **Transcript-bound**: a proof covers both nonces and both endpoint ids, so it is worthless
//!   on any other connection.
//! - A peer whose nonce or endpoint id equals ours is refused outright.
//! - **The client proves first**: a server sends nothing derived from the secret until the
//!   client's proof checked out, so an unauthenticated client learns nothing it could attack
//!   offline. A client that connects to an impostor does hand it a proof to attack offline:
//!   use a high-entropy secret (`genie secret` prints 256 random bits).
//! - [`Auth::seal`] derives a per-connection key from the secret and the transcript, for
//!   backends that exchange more set-up data after authentication (the RDMA QP numbers), so an
//!   attacker on the path cannot swap them.
//!
//! Without a secret on both sides, the exchange still runs (ids and nonces are swapped, no proofs)
//! and proves nothing; a secret on one side only is refused on both.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (an HMAC-SHA256 tag) in bytes.
pub const PROOF_LEN: usize = 32;

const LABEL: &[u8] = b"genie-auth-v1 ";

type HmacSha256 = Hmac<Sha256>;

/// Which side of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We opened the connection; we prove first.
    Client,
    /// We accepted it; we prove only after the client did.
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
    fn other(self) -> Self {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// What each side announces first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's endpoint id.
    pub endpoint: u64,
    /// A fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Whether the sender requires the shared secret.
    pub has_secret: bool,
}

/// Why authentication failed. Every variant means "do not talk to this peer".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// One side has a shared secret and the other has not: configure the same secret on both.
    #[error("shared secret configured on {} side only", if *.ours { "our" } else { "the peer's" })]
    SecretMismatch {
        /// Whether we have one.
        ours: bool,
    },
    /// The peer presented our own nonce or endpoint id: a reflection attempt (or a broken peer).
    #[error("the peer presented our own {0} (reflection refused)")]
    Reflected(&'static str),
    /// The peer's proof does not match our secret: the secrets differ, or the peer is an impostor.
    #[error("the peer's proof does not match our shared secret")]
    BadProof,
    /// The peer has the secret but sent no proof.
    #[error("the peer sent no proof of the shared secret")]
    MissingProof,
    /// The peer sent a proof although no secret is configured.
    #[error("the peer sent a proof although no secret is configured")]
    UnexpectedProof,
    /// A step was taken out of order (a bug in the caller, or a peer skipping a step).
    #[error("authentication step out of order: {0}")]
    OutOfOrder(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitPeerHello,
    /// Hellos swapped; the client may prove, the server awaits the client's proof.
    Hellos,
    /// Client only: our proof went out, the server's is awaited.
    Proved,
    /// Server only: the client's proof checked out; ours may go out now.
    PeerVerified,
    Done,
    Failed,
}

/// One side's authentication. See the [module docs](self).
#[derive(Clone)]
pub struct Auth {
    role: Role,
    secret: Option<Vec<u8>>,
    ours: Hello,
    peer: Option<Hello>,
    state: State,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints the secret.
        f.debug_struct("Auth")
            .field("role", &self.role)
            .field("has_secret", &self.secret.is_some())
            .field("state", &self.state)
            .finish()
    }
}

impl Auth {
    /// Authentication as `role`, with our endpoint id and a fresh random `nonce` (passed in so
    /// tests are deterministic).
    pub fn new(role: Role, secret: Option<&[u8]>, endpoint: u64, nonce: [u8; NONCE_LEN]) -> Self {
        Self {
            role,
            secret: secret.map(<[u8]>::to_vec),
            ours: Hello {
                endpoint,
                nonce,
                has_secret: secret.is_some(),
            },
            peer: None,
            state: State::AwaitPeerHello,
        }
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our hello (the client sends it first; the server after [`Auth::on_peer_hello`]).
    pub fn hello(&self) -> Hello {
        self.ours
    }

    /// The peer's hello, once it arrived.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Whether the peer is authenticated: the client has checked the server's proof, the
    /// server the client's (without secrets: once the exchange is complete).
    pub fn is_authenticated(&self) -> bool {
        match self.role {
            Role::Client => self.state == State::Done,
            Role::Server => matches!(self.state, State::PeerVerified | State::Done),
        }
    }

    fn fail<T>(&mut self, e: AuthError) -> Result<T, AuthError> {
        self.state = State::Failed;
        Err(e)
    }

    /// Takes the peer's hello: refuses a secret on one side only and a peer presenting our own
    /// nonce or endpoint id.
    pub fn on_peer_hello(&mut self, peer: Hello) -> Result<(), AuthError> {
        if self.state != State::AwaitPeerHello {
            return self.fail(AuthError::OutOfOrder("a second hello"));
        }
        if peer.has_secret != self.ours.has_secret {
            return self.fail(AuthError::SecretMismatch {
                ours: self.ours.has_secret,
            });
        }
        if peer.nonce == self.ours.nonce {
            return self.fail(AuthError::Reflected("nonce"));
        }
        if self.secret.is_some() && peer.endpoint == self.ours.endpoint {
            return self.fail(AuthError::Reflected("endpoint id"));
        }
        self.peer = Some(peer);
        self.state = State::Hellos;
        Ok(())
    }

    /// The transcript both proofs cover: client nonce, server nonce, client id, server id.
    fn mac(&self, secret: &[u8], label: &[u8]) -> Option<HmacSha256> {
        let peer = self.peer.as_ref()?;
        let (c, s) = match self.role {
            Role::Client => (&self.ours, peer),
            Role::Server => (peer, &self.ours),
        };
        // HMAC takes keys of any length: `new_from_slice` cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).ok()?;
        m.update(LABEL);
        m.update(label);
        m.update(&c.nonce);
        m.update(&s.nonce);
        m.update(&c.endpoint.to_le_bytes());
        m.update(&s.endpoint.to_le_bytes());
        Some(m)
    }

    /// Our proof, to send now (`None` without a secret). The client proves right after the
    /// hellos; the server only after [`Auth::on_peer_proof`] accepted the client's.
    pub fn our_proof(&mut self) -> Result<Option<[u8; PROOF_LEN]>, AuthError> {
        let next = match (self.role, self.state) {
            (Role::Client, State::Hellos) => State::Proved,
            (Role::Server, State::PeerVerified) => State::Done,
            (Role::Server, State::Hellos) => {
                return self.fail(AuthError::OutOfOrder(
                    "the server proves only after the client",
                ))
            }
            _ => return self.fail(AuthError::OutOfOrder("proof before the hellos")),
        };
        let proof = match &self.secret {
            None => None,
            Some(s) => match self.mac(s, self.role.label()) {
                Some(m) => Some(m.finalize().into_bytes().into()),
                None => return self.fail(AuthError::OutOfOrder("proof before the hellos")),
            },
        };
        self.state = next;
        Ok(proof)
    }

    /// Checks the peer's proof (`None`: the peer sent none), in constant time.
    pub fn on_peer_proof(&mut self, proof: Option<&[u8]>) -> Result<(), AuthError> {
        let next = match (self.role, self.state) {
            (Role::Client, State::Proved) => State::Done,
            (Role::Server, State::Hellos) => State::PeerVerified,
            _ => return self.fail(AuthError::OutOfOrder("a proof out of turn")),
        };
        match (&self.secret, proof) {
            (None, None) => {}
            (None, Some(_)) => return self.fail(AuthError::UnexpectedProof),
            (Some(_), None) => return self.fail(AuthError::MissingProof),
            (Some(s), Some(p)) => {
                let ok = self
                    .mac(s, self.role.other().label())
                    .is_some_and(|m| m.verify_slice(p).is_ok());
                if !ok {
                    return self.fail(AuthError::BadProof);
                }
            }
        }
        self.state = next;
        Ok(())
    }

    /// The MAC of [`Auth::seal`] before finalising: `None` without a secret or before the peer is
    /// authenticated.
    fn seal_mac(&self, role: Role, data: &[u8]) -> Option<HmacSha256> {
        if !self.is_authenticated() {
            return None;
        }
        let secret = self.secret.as_deref()?;
        let key: [u8; 32] = self.mac(secret, b"session")?.finalize().into_bytes().into();
        let mut m = <HmacSha256 as Mac>::new_from_slice(&key).ok()?;
        m.update(role.label());
        m.update(data);
        Some(m)
    }

    /// A tag over `data` under a key only the two authenticated peers of this connection can
    /// compute, labelled by `role` (the sender's). `None` without a secret or before the peer is
    /// authenticated.
    pub fn seal(&self, role: Role, data: &[u8]) -> Option<[u8; PROOF_LEN]> {
        Some(self.seal_mac(role, data)?.finalize().into_bytes().into())
    }

    /// Checks a tag made by the peer with [`Auth::seal`] (`None`: it sent none), in constant time.
    pub fn open(&self, data: &[u8], tag: Option<&[u8]>) -> Result<(), AuthError> {
        if !self.is_authenticated() {
            return Err(AuthError::OutOfOrder("sealed data before authentication"));
        }
        match (self.secret.is_some(), tag) {
            (false, None) => Ok(()),
            (false, Some(_)) => Err(AuthError::UnexpectedProof),
            (true, None) => Err(AuthError::MissingProof),
            (true, Some(t)) => {
                let ok = self
                    .seal_mac(self.role.other(), data)
                    .is_some_and(|m| m.verify_slice(t).is_ok());
                if ok {
                    Ok(())
                } else {
                    Err(AuthError::BadProof)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cs: Option<&str>, ss: Option<&str>) -> (Auth, Auth) {
        (
            Auth::new(Role::Client, cs.map(str::as_bytes), 1, [1; NONCE_LEN]),
            Auth::new(Role::Server, ss.map(str::as_bytes), 2, [2; NONCE_LEN]),
        )
    }

    /// Runs the exchange in memory: Ok when both sides end authenticated.
    fn run(c: &mut Auth, s: &mut Auth) -> Result<(), (Option<AuthError>, Option<AuthError>)> {
        s.on_peer_hello(c.hello()).map_err(|e| (None, Some(e)))?;
        c.on_peer_hello(s.hello()).map_err(|e| (Some(e), None))?;
        let pc = c.our_proof().map_err(|e| (Some(e), None))?;
        s.on_peer_proof(pc.as_ref().map(|p| &p[..]))
            .map_err(|e| (None, Some(e)))?;
        let ps = s.our_proof().map_err(|e| (None, Some(e)))?;
        c.on_peer_proof(ps.as_ref().map(|p| &p[..]))
            .map_err(|e| (Some(e), None))?;
        assert!(c.is_authenticated() && s.is_authenticated());
        Ok(())
    }

    #[test]
    fn matching_secrets_and_no_secrets_authenticate() {
        let (mut c, mut s) = pair(Some("k"), Some("k"));
        run(&mut c, &mut s).unwrap();
        let (mut c, mut s) = pair(None, None);
        run(&mut c, &mut s).unwrap();
    }

    #[test]
    fn wrong_or_one_sided_secret_is_refused_by_the_server_first() {
        let (mut c, mut s) = pair(Some("k"), Some("other"));
        assert_eq!(run(&mut c, &mut s), Err((None, Some(AuthError::BadProof))));
        assert!(!s.is_authenticated());
        let (mut c, mut s) = pair(None, Some("k"));
        assert_eq!(
            run(&mut c, &mut s),
            Err((None, Some(AuthError::SecretMismatch { ours: true })))
        );
    }

    #[test]
    fn the_server_never_proves_before_the_client() {
        let (c, mut s) = pair(Some("k"), Some("k"));
        s.on_peer_hello(c.hello()).unwrap();
        assert!(matches!(s.our_proof(), Err(AuthError::OutOfOrder(_))));
        // And it stays failed: no proof comes out of it afterwards.
        assert!(s.on_peer_proof(Some(&[0; 32])).is_err());
        assert!(s.our_proof().is_err());
    }

    /// The attack on the old RDMA handshake: the attacker echoes the server's own hello and
    /// reflects whatever proof the server produces. Refused at every step.
    #[test]
    fn reflection_is_refused() {
        let mut s = Auth::new(Role::Server, Some(b"k"), 2, [2; NONCE_LEN]);
        assert_eq!(
            s.on_peer_hello(s.hello()),
            Err(AuthError::Reflected("nonce"))
        );
        // A fresh nonce but the server's endpoint id.
        let mut s = Auth::new(Role::Server, Some(b"k"), 2, [2; NONCE_LEN]);
        let mut echo = s.hello();
        echo.nonce = [9; NONCE_LEN];
        assert_eq!(
            s.on_peer_hello(echo),
            Err(AuthError::Reflected("endpoint id"))
        );
        // Proofs from a second server session (as a reflecting attacker could collect by
        // opening another connection as a client) are server-labelled: never a client proof.
        let mut victim = Auth::new(Role::Server, Some(b"k"), 2, [2; NONCE_LEN]);
        let attacker_hello = Hello {
            endpoint: 7,
            nonce: [7; NONCE_LEN],
            has_secret: true,
        };
        victim.on_peer_hello(attacker_hello).unwrap();
        // The only way to get a server proof is to prove first; the attacker cannot, so the
        // best it can do is send garbage or a proof from another transcript.
        let (mut c, mut other) = pair(Some("k"), Some("k"));
        run(&mut c, &mut other).unwrap();
        let mut c2 = Auth::new(Role::Client, Some(b"k"), 1, [1; NONCE_LEN]);
        c2.on_peer_hello(other.hello()).unwrap();
        let stolen = c2.our_proof().unwrap().unwrap();
        assert_eq!(
            victim.on_peer_proof(Some(&stolen)),
            Err(AuthError::BadProof),
            "a proof from another transcript"
        );
    }

    #[test]
    fn proofs_are_role_bound() {
        // A client proof for a transcript is not the server proof for the same transcript.
        let (mut c, mut s) = pair(Some("k"), Some("k"));
        s.on_peer_hello(c.hello()).unwrap();
        c.on_peer_hello(s.hello()).unwrap();
        let pc = c.our_proof().unwrap().unwrap();
        s.on_peer_proof(Some(&pc)).unwrap();
        let ps = s.our_proof().unwrap().unwrap();
        assert_ne!(pc, ps);
        assert_eq!(c.on_peer_proof(Some(&pc)), Err(AuthError::BadProof));
    }

    #[test]
    fn missing_and_unexpected_proofs() {
        let (c, mut s) = pair(Some("k"), Some("k"));
        s.on_peer_hello(c.hello()).unwrap();
        assert_eq!(s.on_peer_proof(None), Err(AuthError::MissingProof));
        let (c, mut s) = pair(None, None);
        s.on_peer_hello(c.hello()).unwrap();
        assert_eq!(
            s.on_peer_proof(Some(&[0; 32])),
            Err(AuthError::UnexpectedProof)
        );
    }

    #[test]
    fn sealed_data_is_bound_to_the_connection_and_the_sender() {
        let (mut c, mut s) = pair(Some("k"), Some("k"));
        assert_eq!(c.seal(Role::Client, b"x"), None, "not before auth");
        run(&mut c, &mut s).unwrap();
        let t = c.seal(Role::Client, b"qp 17").unwrap();
        s.open(b"qp 17", Some(&t)).unwrap();
        assert_eq!(s.open(b"qp 18", Some(&t)), Err(AuthError::BadProof));
        // The server's own tag is not accepted as the client's.
        let ts = s.seal(Role::Server, b"qp 17").unwrap();
        assert_eq!(s.open(b"qp 17", Some(&ts)), Err(AuthError::BadProof));
        c.open(b"qp 17", Some(&ts)).unwrap();
        // Another connection (other nonces) has another key.
        let mut c2 = Auth::new(Role::Client, Some(b"k"), 1, [3; NONCE_LEN]);
        let mut s2 = Auth::new(Role::Server, Some(b"k"), 2, [4; NONCE_LEN]);
        run(&mut c2, &mut s2).unwrap();
        assert_eq!(s2.open(b"qp 17", Some(&t)), Err(AuthError::BadProof));
    }
}
