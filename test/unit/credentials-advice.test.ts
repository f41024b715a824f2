/** What the controller and the sidecar say about a refused login's credentials, without showing them. */
import assert from 'node:assert/strict';
import { credentialsAdvice } from '../../src/core/credentials.ts';

describe('credentialsAdvice', function () {
  const rows: Array<[string, string, string, RegExp | undefined]> = [
    ['a clean login', 'app', 's3cret', undefined],
    ['a password with the newline echo leaves', 'app', 's3cret\n', /^the password in the credentials Secret ends with a newline/],
    ['a password with a Windows line end', 'app', 's3cret\r\n', /^the password .* ends with a newline/],
    ['a password with a leading space', 'app', ' s3cret', /^the password .* begins or ends with white space/],
    ['a user name with a newline', 'app\n', 's3cret', /^the user name in the credentials Secret ends with a newline/],
    ['an inner space is the password\'s own', 'app', 's3 cret', undefined],
  ];
  for (const [name, username, password, expected] of rows) {
    it(name, function () {
      const advice = credentialsAdvice(username, password);
      if (expected === undefined) assert.equal(advice, undefined);
      else {
        assert.match(advice ?? '', expected);
        assert.ok(!advice!.includes('s3cret'), 'the advice never shows the value');
      }
    });
  }
});
