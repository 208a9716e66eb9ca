// The sign-in page: says so when the last attempt failed (/dashboard/login#failed).
'use strict';
if (location.hash === '#failed') {
  document.getElementById('login-error').hidden = false;
  history.replaceState(null, '', '/dashboard/login');
}
