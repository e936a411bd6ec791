"use strict";
// Swagger UI (shipped in BentoML's wheel, served from /docs/) on this service's OpenAPI document. The validator
// badge is off: it would send the document to a third-party host.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    defaultModelsExpandDepth: 0,
  });
});
