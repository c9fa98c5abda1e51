// The index page: it shows the demo pages when this server is in demo mode
// (it hands demo credentials to this browser), and only then.
import { byId, demoGroup } from "/static/pages.js";

if (await demoGroup()) byId("demo").hidden = false;
document.body.dataset.ready = "true";
