import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';

describe('pki', function () {
  it('issues a server certificate that the CA verifies, with the SANs asked for', async function () {
    const ca = await createCertificateAuthority('test-ca', 10);
    const leaf = await issueCertificate(ca, { commonName: 'svc', dnsNames: ['svc.ns.svc'], ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 2 });
    const caCert = new X509Certificate(ca.certPem);
    const cert = new X509Certificate(leaf.certPem);
    assert.ok(caCert.ca);
    assert.ok(cert.verify(caCert.publicKey));
    assert.ok(cert.checkIssued(caCert));
    assert.match(cert.subjectAltName ?? '', /DNS:svc\.ns\.svc/);
    assert.match(cert.subjectAltName ?? '', /IP Address:127\.0\.0\.1/);
    assert.ok(!cert.ca);
    const days = (new Date(cert.validTo).getTime() - new Date(cert.validFrom).getTime()) / 86_400_000;
    assert.ok(Math.abs(days - 2) < 0.01, `validity ${days} days`);
  });

  it('puts organizations in the subject (Kubernetes groups)', async function () {
    const ca = await createCertificateAuthority('test-ca', 10);
    const leaf = await issueCertificate(ca, { commonName: 'admin', organizations: ['system:masters'], usage: 'client', validityDays: 1 });
    assert.match(new X509Certificate(leaf.certPem).subject, /O=system:masters/);
  });
});
