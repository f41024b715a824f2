/**
 * SCRAM channel binding, pure parts: the mechanism and GS2 header per
 * libpq's channel_binding, and the tls-server-end-point hash of certificates
 * signed with each algorithm a PostgreSQL server certificate may carry.
 */
import assert from 'node:assert/strict';
import { createHash, webcrypto } from 'node:crypto';
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';
import { channelBindingAttribute, chooseSaslMethod, endPointHash, unboundLoginRefusal } from '../../src/core/protocol/index.ts';

x509.cryptoProvider.set(webcrypto);

type KeyAlgorithm = webcrypto.RsaHashedKeyGenParams | webcrypto.EcKeyGenParams | webcrypto.Algorithm;
type SigningAlgorithm = webcrypto.Algorithm | webcrypto.RsaPssParams | webcrypto.EcdsaParams;

async function certificate(keyAlgorithm: KeyAlgorithm, signingAlgorithm: SigningAlgorithm): Promise<Buffer> {
  const keys = await webcrypto.subtle.generateKey(keyAlgorithm as webcrypto.RsaHashedKeyGenParams, true, ['sign', 'verify']);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01', name: 'CN=postgres', notBefore: new Date(), notAfter: new Date(Date.now() + 86_400_000),
    keys, signingAlgorithm,
  });
  return Buffer.from(cert.rawData);
}

const rsa = (hash: string): webcrypto.RsaHashedKeyGenParams => ({ name: 'RSASSA-PKCS1-v1_5', modulusLength: 1024, publicExponent: new Uint8Array([1, 0, 1]), hash });

describe('channel binding', function () {
  describe('the mechanism and GS2 header (libpq channel_binding)', function () {
    const both = ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256', ''];
    const rows: Array<[string, string[], boolean, 'disable' | 'prefer' | 'require', string]> = [
      ['prefer, TLS, PLUS offered: binds', both, true, 'prefer', 'SCRAM-SHA-256-PLUS p=tls-server-end-point,,'],
      ['prefer, TLS, PLUS not offered: y (a relay that strips PLUS is caught by the server)', ['SCRAM-SHA-256', ''], true, 'prefer', 'SCRAM-SHA-256 y,,'],
      ['prefer, no TLS: n', ['SCRAM-SHA-256', ''], false, 'prefer', 'SCRAM-SHA-256 n,,'],
      ['disable, TLS, PLUS offered: n', both, true, 'disable', 'SCRAM-SHA-256 n,,'],
      ['require, TLS, PLUS offered: binds', both, true, 'require', 'SCRAM-SHA-256-PLUS p=tls-server-end-point,,'],
      ['require, TLS, PLUS not offered: refused', ['SCRAM-SHA-256', ''], true, 'require', 'refused: channel binding is required (spec.database.channelBinding), but the server did not offer SCRAM-SHA-256-PLUS'],
      ['require, no TLS: refused', ['SCRAM-SHA-256', ''], false, 'require', 'refused: channel binding is required (spec.database.channelBinding), but SSL is not in use'],
      ['prefer, only an unknown mechanism: refused', ['SCRAM-SHA-512', ''], true, 'prefer', 'refused: no supported SASL mechanism among SCRAM-SHA-512'],
    ];
    for (const [name, offered, tls, mode, expected] of rows) {
      it(name, function () {
        const choice = chooseSaslMethod(offered, tls, mode);
        assert.equal('refused' in choice ? `refused: ${choice.refused}` : `${choice.mechanism} ${choice.gs2Header}`, expected);
      });
    }

    it('require refuses a login made without SCRAM; prefer and disable accept it', function () {
      assert.match(unboundLoginRefusal('require', 'md5') ?? '', /channel binding is required .* with md5/);
      assert.equal(unboundLoginRefusal('prefer', 'md5'), undefined);
      assert.equal(unboundLoginRefusal('disable', 'a cleartext password'), undefined);
    });
  });

  describe('the tls-server-end-point hash (RFC 5929) by signature algorithm', function () {
    this.timeout(30_000);
    const cases: Array<[string, () => Promise<Buffer>, string | undefined]> = [
      ['RSA with SHA-256', () => certificate(rsa('SHA-256'), { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }), 'sha256'],
      ['RSA with SHA-384', () => certificate(rsa('SHA-384'), { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-384' }), 'sha384'],
      ['RSA with SHA-512', () => certificate(rsa('SHA-512'), { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-512' }), 'sha512'],
      ['RSA with SHA-1 (hashed with SHA-256, as the RFC says)', () => certificate(rsa('SHA-1'), { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-1' }), 'sha256'],
      ['ECDSA P-256 with SHA-256', () => certificate({ name: 'ECDSA', namedCurve: 'P-256' }, { name: 'ECDSA', hash: 'SHA-256' }), 'sha256'],
      ['ECDSA P-384 with SHA-384', () => certificate({ name: 'ECDSA', namedCurve: 'P-384' }, { name: 'ECDSA', hash: 'SHA-384' }), 'sha384'],
      ['RSA-PSS with SHA-512 (the hash in its parameters)', () => certificate({ ...rsa('SHA-512'), name: 'RSA-PSS', modulusLength: 2048 }, { name: 'RSA-PSS', saltLength: 64, hash: 'SHA-512' }), 'sha512'],
      ['Ed25519: none (PostgreSQL cannot bind to it either)', () => certificate({ name: 'Ed25519' }, { name: 'Ed25519' }), undefined],
    ];
    for (const [name, make, expected] of cases) {
      it(name, async function () {
        assert.equal(endPointHash(await make()), expected);
      });
    }

    it('the client-final c= attribute: the GS2 header alone, or with the certificate hash', async function () {
      assert.equal(channelBindingAttribute('n,,'), 'biws');
      assert.equal(channelBindingAttribute('y,,'), 'eSws');
      const der = await certificate(rsa('SHA-384'), { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-384' });
      const expected = Buffer.concat([Buffer.from('p=tls-server-end-point,,'), createHash('sha384').update(der).digest()]).toString('base64');
      assert.equal(channelBindingAttribute('p=tls-server-end-point,,', der), expected);
      assert.throws(() => channelBindingAttribute('p=tls-server-end-point,,', undefined), /needs the server's certificate/);
    });

    it('a truncated or malformed certificate is an error, not a guess', function () {
      assert.throws(() => endPointHash(Buffer.from([0x30, 0x82, 0x01])), /truncated|bad length/);
      assert.throws(() => endPointHash(Buffer.from([0x04, 0x00])), /unexpected tag/);
    });
  });
});
