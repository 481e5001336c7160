//! Certificates made at test time with rcgen: a CA and the server and client leaves it issues,
//! as PEM, in memory or written out as the CLI's TLS flags want them.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM.
pub type CertAndKey = (Vec<u8>, Vec<u8>);

/// A CA and what it issued.
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A fresh CA with `name` as its common name.
    pub fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca: cert.pem().into_bytes(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> CertAndKey {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for `names`: with mutual TLS, the first names the node.
    pub fn client(&self, names: &[&str]) -> CertAndKey {
        self.leaf(names, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertAndKey {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// Writes the CA and one server and one client leaf into `dir` as `ca.pem`, `server.pem`,
    /// `server.key`, `client.pem` and `client.key`.
    pub fn write(&self, dir: &Path, server_name: &str, client_name: &str) {
        std::fs::write(dir.join("ca.pem"), &self.ca).unwrap();
        for (name, (cert, key)) in [
            ("server", self.server(&[server_name])),
            ("client", self.client(&[client_name])),
        ] {
            std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
        }
    }
}
